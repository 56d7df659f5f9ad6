// hegelion-queue dashboard: live refresh and the two write actions. The server renders (and escapes) every
// fragment; this only swaps them in. No inline script anywhere: the Content-Security-Policy forbids it.
"use strict";

const every = Number(document.body.dataset.refreshMs) || 5000;

for (const el of document.querySelectorAll("[data-refresh]")) {
  setInterval(async () => {
    try {
      const r = await fetch(el.dataset.refresh, { cache: "no-store" });
      if (r.ok) {
        el.innerHTML = await r.text();
        document.body.dataset.refreshed = String(Date.now());
      }
    } catch (e) {
      // the server or Redis is away for a moment: keep showing the last fragment
    }
  }, every);
}

// Resume / retry dead letters: POST with the bearer token (asked once, kept for this tab).
document.addEventListener("click", async (ev) => {
  const button = ev.target.closest("button[data-action]");
  if (!button) return;
  const out = document.getElementById("action-result");
  const token = sessionStorage.getItem("hegelion-token") || window.prompt("Bearer token (HEGELION_SERVE_TOKEN)");
  if (!token) return;
  button.disabled = true;
  try {
    const r = await fetch(button.dataset.action, { method: "POST", headers: { Authorization: "Bearer " + token } });
    const text = await r.text();
    if (r.ok) sessionStorage.setItem("hegelion-token", token);
    else sessionStorage.removeItem("hegelion-token");
    out.textContent = (r.ok ? "done: " : "refused: ") + text;
  } finally {
    button.disabled = false;
  }
});
