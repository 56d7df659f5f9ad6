"""Where the real kimi-cli is for the tests and the bench: HEGELION_TEST_KIMI_BIN (`none`: as if it were not
installed, to check that path), else the repo's .kimi-venv (`make kimi`), else nowhere (those tests skip)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def real_kimi() -> str | None:
    chosen = os.environ.get("HEGELION_TEST_KIMI_BIN")
    if chosen:
        return None if chosen == "none" else chosen
    installed = ROOT / ".kimi-venv" / "bin" / "kimi"
    return str(installed) if installed.exists() else None
