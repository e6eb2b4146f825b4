"""Every code block in README.md and docs/*.md runs (python) or parses (the guided-swap command lines).

A page's python blocks run in order in one namespace, in a fresh folder. Files a snippet reads as a user would
(their weights, their photos) are made here, and the page says so next to the snippet. A python block that
cannot run says why on the line above it, visibly: ``*Not run by the test suite: REASON.*`` (keep that rare).
"""
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"\*Not run by the test suite: [^*]+\.\*\s*$")
LANGUAGES = ("python", "bash", "text")
# Shell lines the suite cannot run from inside itself: installing, and running the suite.
NOT_COMMANDS = ("pip ", "pytest")


def blocks(page: Path):
    """(language, code, line number, marked not-run) for every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        yield match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1, bool(NOT_RUN.search(before))


def _photo(name: str, path: Path) -> None:
    from skimage import data, io

    io.imsave(str(path), getattr(data, name)(), check_contrast=False)


def _quickstart_files(folder: Path) -> None:
    """What the quick start's "Your model" snippet reads: a weights file and two photos."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pth")
    _photo("chelsea", folder / "cat.jpg")
    _photo("coffee", folder / "coffee.jpg")


FIXTURES = {"quickstart.md": _quickstart_files}


def test_every_block_has_a_known_language():
    untagged = [f"{page.name}:{line}" for page in PAGES for language, _, line, _ in blocks(page)
                if language not in LANGUAGES]
    assert not untagged, f"tag these code blocks with one of {LANGUAGES}: {untagged}"


def test_not_run_blocks_are_rare():
    marked = [f"{page.name}:{line}" for page in PAGES for *_, line, not_run in blocks(page) if not_run]
    assert len(marked) <= 2, f"too many python blocks are not run: {marked}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang == "python" for lang, *_ in blocks(p))],
                         ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if page.name in FIXTURES:
        FIXTURES[page.name](tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for language, code, line, not_run in blocks(page):
        if language == "python" and not not_run:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)


def _command_lines(code: str):
    for line in code.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def _guided_swap_arguments(words):
    """The arguments of a guided-swap command line (``guided-swap ...``, ``python -m guided_swap ...``,
    ``torchrun [options] -m guided_swap ...``), or None when the line runs something else."""
    if words[0] == "guided-swap":
        return words[1:]
    if words[0] in ("python", "torchrun") and "-m" in words:
        at = words.index("-m")
        if words[at + 1:at + 2] == ["guided_swap"]:
            return words[at + 2:]
    return None


def test_command_lines_parse():
    """Each guided-swap line parses with the real command's parser; ``python -m guided_swap.X`` names a module
    with a ``main``; install and test lines are the only others allowed."""
    import importlib

    from guided_swap.app import cli

    checked = 0
    for page in PAGES:
        for language, code, line, _ in blocks(page):
            if language != "bash":
                continue
            for command in _command_lines(code):
                where = f"{page.name}:{line}: {command}"
                words = shlex.split(command)
                arguments = _guided_swap_arguments(words)
                if arguments is not None:
                    if arguments[:1] == ["bench"]:  # its options belong to the benchmark's own parser
                        continue
                    try:
                        cli.parser().parse_args(arguments)
                    except SystemExit:
                        pytest.fail(f"does not parse: {where}")
                elif words[:2] == ["python", "-m"]:
                    assert hasattr(importlib.import_module(words[2]), "main"), where
                else:
                    assert command.startswith(NOT_COMMANDS), f"a shell line the suite cannot check: {where}"
                checked += 1
    assert checked >= 5


def test_block_finder_sees_fences_and_marks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("a\n\n```python\nx = 1\n```\n\n*Not run by the test suite: needs a GPU.*\n```python\ny\n```\n"
                    "```bash\nguided-swap demo\n```\n")
    found = list(blocks(page))
    assert [(lang, code) for lang, code, _, _ in found] == [("python", "x = 1\n"), ("python", "y\n"),
                                                           ("bash", "guided-swap demo\n")]
    assert [mark for *_, mark in found] == [False, True, False]
