"""The README stays true to the code."""

from hegelion_queue.settings import settings_table

from .conftest import ROOT


def test_readme_configuration_table_matches_the_settings():
    assert settings_table() in (ROOT / "README.md").read_text(), "run `make readme`"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
