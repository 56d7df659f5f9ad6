"""The README stays true to the code."""

from hegelion_queue.settings import settings_table

from .conftest import ROOT


def test_readme_configuration_table_matches_the_settings():
    assert settings_table() in (ROOT / "README.md").read_text(), "run `make readme`"


def test_readme_metric_list_matches_the_collector():
    from hegelion_queue.ops.metrics import metrics_table

    assert metrics_table() in (ROOT / "README.md").read_text(), "run `make readme`"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_env_example_documents_every_setting():
    from hegelion_queue.settings import Settings, env_example

    text = (ROOT / ".env.example").read_text()
    assert text == env_example(), "run `make readme`"
    for name in Settings.model_fields:
        assert f"HEGELION_{name.upper()}=" in text
