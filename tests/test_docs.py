"""The README and docs/ point at what exists: every relative link at a file (and a heading
where it names one), every ``jaxcap`` command at a real subcommand and its flags at real
options, every ``python path.py`` at a script; the leaderboard in the docs is the runner's."""

import argparse
import re
from pathlib import Path

import pytest

from jaxcap.cli import build_parser

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```([a-z]*)\n(.*?)```", re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"\bjaxcap ([a-z][a-z|-]*)((?: +[^\s|;&#`]+)*)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = CODE_BLOCK.sub("", path.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def _code(text: str) -> list[str]:
    """The commands written in a document: code blocks but Python's (continued lines
    joined) and spans."""
    blocks = [block.replace("\\\n", " ") for language, block in CODE_BLOCK.findall(text)
              if language != "python"]
    spans = CODE_SPAN.findall(CODE_BLOCK.sub("", text))
    return [line for block in blocks for line in block.splitlines()] + spans


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading in {file.name}")
    assert broken == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_command_names_a_real_subcommand_and_its_options(document):
    subcommands, wrong = _subcommands(), []
    for line in _code(document.read_text()):
        for names, rest in COMMAND.findall(line):
            for name in names.split("|"):
                if name not in subcommands:
                    wrong.append(f"jaxcap {name}: no such subcommand ({line.strip()})")
                    continue
                options = subcommands[name]._option_string_actions
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w.-]*)", rest):
                    if "." not in flag and flag not in options:  # --config.KEY: an override
                        wrong.append(f"jaxcap {name} {flag}: no such option ({line.strip()})")
        for script in re.findall(r"\bpython (?:-m pytest )?([\w/]+\.py)\b", line):
            if not (ROOT / script).exists():
                wrong.append(f"{script}: no such script")
    assert wrong == []


def test_the_checks_find_a_wrong_command_and_a_broken_link(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("# Title\n\nSee [there](missing.md) and [here](#title), "
                        "[nowhere](#nowhere).\n\n```bash\njaxcap trian --config shapes\n"
                        "jaxcap train --no-such-flag --config.seed=1\n```\n")
    assert [target for target in LINK.findall(document.read_text())] == [
        "missing.md", "#title", "#nowhere"]
    assert anchors(document) == {"title"}
    found = [(names, re.findall(r"(--[a-z][\w.-]*)", rest))
             for line in _code(document.read_text()) for names, rest in COMMAND.findall(line)]
    assert found == [("trian", ["--config"]), ("train", ["--no-such-flag", "--config.seed"])]
    assert "trian" not in _subcommands() and "--no-such-flag" not in \
        _subcommands()["train"]._option_string_actions


LEADERBOARD = ROOT / "experiments" / "results" / "shapes-variants" / "results.md"


@pytest.mark.skipif(not LEADERBOARD.exists(), reason="the leaderboard has not been computed")
def test_the_leaderboard_in_the_docs_is_the_runners_table():
    table = [line for line in LEADERBOARD.read_text().splitlines() if line.startswith("|")]
    docs = (ROOT / "docs" / "variants.md").read_text()
    start = docs.index("<!-- leaderboard: experiments/results/shapes-variants/results.md -->")
    shown = [line for line in docs[start:docs.index("<!-- end of leaderboard -->")].splitlines()
             if line.startswith("|")]
    assert shown == table[:len(shown)] and len(shown) >= 8  # header, rule, six variants
