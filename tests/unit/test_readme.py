"""What a newcomer reads: the README's models table is the registry's, its test command is `make test` (what CI
runs), and every relative link of the README and of docs/ points at a file (or a heading) that exists."""

from __future__ import annotations

import re

from common.paths import REPO_ROOT
from families.model_table import markdown_table, readme_table, with_table

README = REPO_ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_models_table_is_the_registrys():
    text = README.read_text(encoding="utf-8")
    table = readme_table(text)
    assert table is not None, "README.md lost the models table's markers: see families/model_table.py"
    expected = markdown_table()
    assert table == expected, (
        "README.md's models table differs from families/registry.py; run `python -m families.model_table "
        f"--write-readme`, or paste:\n\n{expected}")
    assert with_table(text) == text


def test_the_readmes_test_command_is_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make test\b", quick, re.M), "the README's quick start must show `make test` (.ci/run runs it)"
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    heads = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_resolves():
    broken = []
    for doc in [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
