"""The README's promises that a script can check."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_run_and_test_commands():
    run, test = _readme_commands()[:2]
    assert run.endswith("relay serve")
    assert "[test]" in test and test.endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    test = _readme_commands()[1]
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_lists_every_setting_and_its_env_name():
    from relay.config import Settings

    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`{Settings.env_name(name)}`" in readme, name
