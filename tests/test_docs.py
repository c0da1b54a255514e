"""The README's and docs' Python examples run as written, and CI runs the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


LAUNCHED_SCRIPT = "# launched with torchrun"
"""First line of an example that is a script for ``torchrun --nproc_per_node N`` (it needs a process group); the
test of what it does runs under a launcher in its own test file, so this one skips it."""


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    """A page's examples run in order in one namespace, as a reader would paste them into one session."""
    blocks = [b for b in _python_blocks(page) if "moe_zoo" in b and ">>>" not in b]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        if block.startswith(LAUNCHED_SCRIPT):
            continue
        exec(compile(block, f"{page.name}:example", "exec"), namespace)


def test_every_doc_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(commands) >= 2, "the README opens with two commands: the demo and the tests"
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()
