"""Where the real kimis are for the tests and the bench. Kimi Code CLI (2.x): HEGELION_TEST_KIMI_CODE_BIN, else the
repo's .kimi-code (`make kimi`). The legacy kimi-cli (1.x): HEGELION_TEST_KIMI_BIN, else the repo's .kimi-venv
(`make kimi-legacy`). `none`: as if it were not installed, to check that path; not found: those tests skip."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _find(variable: str, installed: Path) -> str | None:
    chosen = os.environ.get(variable)
    if chosen:
        return None if chosen == "none" else chosen
    return str(installed) if installed.exists() else None


def real_kimi() -> str | None:
    """The legacy kimi-cli 1.51."""
    return _find("HEGELION_TEST_KIMI_BIN", ROOT / ".kimi-venv" / "bin" / "kimi")


def real_kimi_code() -> str | None:
    """Kimi Code CLI 2.x."""
    return _find("HEGELION_TEST_KIMI_CODE_BIN", ROOT / ".kimi-code" / "bin" / "kimi")
