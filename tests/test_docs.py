"""The docs stay true to the code: generated tables, quoted error messages, the site builds."""

import ast
import re
import shutil
import subprocess
import sys

import pytest

from hegelion_queue.settings import settings_table

from .conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _code(text):
    """The command lines a page shows: fenced blocks and inline code spans."""
    yield from re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def _shown(pattern):
    return [(page.name, m) for page in PAGES for code in _code(page.read_text())
            for line in code.splitlines() for m in re.finditer(pattern, line)]


def test_configuration_table_matches_the_settings():
    assert settings_table() in (DOCS / "configuration.md").read_text(), "run `make tables`"


def test_metric_list_matches_the_collector():
    from hegelion_queue.ops.metrics import metrics_table

    assert metrics_table() in (DOCS / "operating.md").read_text(), "run `make tables`"


def test_every_command_and_option_the_docs_show_is_in_its_help_and_every_command_is_shown():
    import typer

    from hegelion_queue.cli import app

    commands = {name: {o for p in c.params for o in (*p.opts, *p.secondary_opts, "--help")}
                for name, c in typer.main.get_command(app).commands.items()}
    wrong, shown = [], set()
    for page, m in _shown(r"hegelion-queue ([a-z][a-z-]*)([^|;&]*)"):
        command, rest = m.groups()
        shown.add(command)
        if command not in commands:
            wrong.append(f"{page}: hegelion-queue {command}")
            continue
        for option, prefix in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)(…)?", rest):  # `--budget-…`: a family
            if not any(o == option or prefix and o.startswith(option) for o in commands[command]):
                wrong.append(f"{page}: hegelion-queue {command} {option}")
    assert not wrong, wrong
    assert set(commands) <= shown, f"commands no page shows: {set(commands) - shown}"


def test_every_make_target_the_docs_show_exists_and_every_target_is_shown():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {m.group(1) for _, m in _shown(r"\bmake ([a-z][a-z-]*)")}
    assert shown <= targets, f"make targets the docs show that the Makefile lacks: {shown - targets}"
    assert targets <= shown, f"make targets no page shows: {targets - shown}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_env_example_documents_every_setting():
    from hegelion_queue.settings import Settings, env_example

    text = (ROOT / ".env.example").read_text()
    assert text == env_example(), "run `make tables`"
    for name in Settings.model_fields:
        assert f"HEGELION_{name.upper()}=" in text


def _source_strings() -> str:
    """Every string literal of the package, f-strings with their holes as NUL: what a message can be made of."""
    parts = []
    for path in (ROOT / "hegelion_queue").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                parts.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts.append(node.value)
    return "\n".join(parts)


def test_troubleshooting_quotes_messages_the_code_writes():
    page = (DOCS / "troubleshooting.md").read_text()
    quoted = re.findall(r"\*\*`` (.+?) ``\*\*", page)
    assert len(quoted) >= 30, quoted
    source = _source_strings()
    for message in quoted:
        for fragment in (f.strip(" ,;:()") for f in message.split("…")):
            if len(fragment) >= 6:
                assert fragment in source, \
                    f"troubleshooting.md quotes {message!r}, but the code no longer writes {fragment!r}"


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f" {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


def test_the_docs_site_builds_strict(tmp_path):
    if shutil.which("mkdocs", path=str(ROOT / ".venv" / "bin")) is None and not (
            ROOT / ".venv" / "bin" / "mkdocs").exists():
        pytest.fail("mkdocs is missing: `make setup` installs it (the dev extra)")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "site" / "troubleshooting" / "index.html").exists()
    api = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "AcpPool" in api and "commit" in api  # mkdocstrings rendered the modules' docstrings
