"""The README's first screen stays true: its test command is the one CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_screen = readme.split("---")[0]
    blocks = _bash_blocks(first_screen)
    assert len(blocks) == 2, "the first screen must hold exactly two commands: the default job and the tests"
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    after_venv = test_cmd.split("&& . .venv/bin/activate && ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert after_venv in ci, f".ci/run must run the README's test command: {after_venv!r}"
