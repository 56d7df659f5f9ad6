"""A tiny OpenAI-compatible chat server for tests: records every request body, answers a dialectic.

Standard library only, on 127.0.0.1 in a thread. `POST …/chat/completions` answers with the fake kimi's
dialectic for the last user message, as one JSON body or as SSE chunks when the request says
`"stream": true` (kimi does, with `stream_options.include_usage`). A `[[status:NNN]]` marker in the last
user message answers HTTP NNN with an OpenAI-style error body instead; `[[tool:NAME:ARGS-JSON]]` first
answers with a call of tool NAME (until the conversation holds a tool result), as a hostile model would;
`[[sleep:S]]` answers after S seconds. A `<system-reminder>` user message (Kimi Code adds one) is not the prompt.

It is also a Kimi account's OAuth server, for logins made the way `kimi login` leaves them: `POST
/api/oauth/token` rotates tokens (only the newest refresh token is accepted, as a real server does), and with
`require_token` the chat endpoint answers 401 to any bearer but the newest access token. Every request's
Authorization header is recorded.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .fake_kimi import dialectic


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user" and not message_text(message).lstrip().startswith("<system-reminder>"):
            return message_text(message)
    return ""


class ChatServer:
    def __init__(self, require_token: bool = False, token_lifetime: int = 3600) -> None:
        self.requests: list[dict] = []  # {"path", "body", "auth"} of every POST
        self.lock = threading.Lock()
        self.require_token, self.token_lifetime = require_token, token_lifetime
        self.tokens = 1  # the newest access / refresh token is at-N / rt-N
        self.delay = 0.0  # seconds every chat answer waits
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.requests.append({"path": self.path, "body": None})
                self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) or b"{}"
                form = "form" in self.headers.get("Content-Type", "")
                body = dict(urllib.parse.parse_qsl(raw.decode())) if form else json.loads(raw)
                auth = self.headers.get("Authorization")
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": auth})
                if self.path.rstrip("/").endswith("/api/oauth/token"):
                    self._oauth(body)
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                if server.require_token and auth != f"Bearer at-{server.tokens}":
                    self._json(401, {"error": {"message": "invalid access token", "type": "authentication_error"}})
                    return
                prompt = last_user_text(body)
                if server.delay:
                    time.sleep(server.delay)
                if m := re.search(r"\[\[sleep:([\d.]+)\]\]", prompt):
                    time.sleep(float(m.group(1)))
                if m := re.search(r"\[\[status:(\d{3})\]\]", prompt):
                    self._json(int(m.group(1)), {"error": {"message": f"test status {m.group(1)}", "type": "test"}})
                    return
                text = dialectic(prompt, tagged=True)
                usage = {"prompt_tokens": 50, "completion_tokens": 40, "total_tokens": 90}
                base = {"id": "chatcmpl-test", "created": int(time.time()), "model": body.get("model", "test")}
                tool = re.search(r"\[\[tool:(\w+):(\{.*?\})\]\]", prompt)
                if tool and not any(m.get("role") == "tool" for m in body.get("messages") or []):
                    call = {"id": "call_1", "type": "function",
                            "function": {"name": tool.group(1), "arguments": tool.group(2)}}
                    if not body.get("stream"):
                        self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                            {"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]})
                        return
                    self._stream(base, [{"role": "assistant", "content": None,
                                         "tool_calls": [{"index": 0, **call}]}], "tool_calls", body, usage)
                    return
                if not body.get("stream"):
                    self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})
                    return
                chunks = [{"role": "assistant", "content": ""}] + [
                    {"content": text[i:i + 64]} for i in range(0, len(text), 64)]
                self._stream(base, chunks, "stop", body, usage)

            def _oauth(self, form: dict) -> None:
                with server.lock:
                    if form.get("grant_type") == "refresh_token" and form.get("refresh_token") != f"rt-{server.tokens}":
                        self._json(400, {"error": "invalid_grant", "error_description": "refresh token reused"})
                        return
                    server.tokens += 1
                    n = server.tokens
                self._json(200, {"access_token": f"at-{n}", "refresh_token": f"rt-{n}", "token_type": "Bearer",
                                 "expires_in": server.token_lifetime, "scope": "kimi-code"})

            def _stream(self, base: dict, deltas: list[dict], finish: str, body: dict, usage: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for delta in deltas:
                    self._event({**base, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                self._event({**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, obj: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def chat_requests(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].rstrip("/").endswith("/chat/completions")]

    def chat_bodies(self) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests if r["path"].rstrip("/").endswith("/chat/completions")]

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
