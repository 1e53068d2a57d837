"""The README's table of models, rendered from the registry (:data:`families.registry.MODELS`), so the two
cannot disagree (``tests/unit/test_readme.py`` checks the README holds exactly this table).

``python -m families.model_table`` prints it; ``--write-readme`` replaces the table in ``README.md`` (between
:data:`BEGIN` and :data:`END`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from families.registry import MODELS, ModelSpec

BEGIN = "<!-- models table: generated from families/registry.py by `python -m families.model_table --write-readme` -->"
END = "<!-- end of models table -->"


def _row(spec: ModelSpec) -> str:
    source = f"`{spec.source}` (in this repo)" if spec.local else f"`{spec.source}`"
    return (f"| `{spec.id}` | {spec.family} | {source} | {spec.steps} / {spec.guidance:.1f} | "
            f"{spec.height}x{spec.width} | {spec.description} |")


def markdown_table(models: dict[str, ModelSpec] | None = None) -> str:
    """One Markdown row per registry entry, in registry order (``id``, family, source, default steps / guidance,
    default image size in pixels, description), ending with a newline."""
    models = MODELS if models is None else models
    lines = ["| id | family | source | steps / guidance | size (px) | notes |", "|---|---|---|---|---|---|"]
    return "\n".join(lines + [_row(s) for s in models.values()]) + "\n"


def readme_table(readme: str) -> str | None:
    """The table between the markers of ``readme`` (text), or None when the markers are missing."""
    if BEGIN not in readme or END not in readme:
        return None
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def with_table(readme: str) -> str:
    """``readme`` with its table replaced by :func:`markdown_table`."""
    head, rest = readme.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{markdown_table()}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    from common.cli import ArgumentParser
    from common.io import atomic_path
    from common.paths import REPO_ROOT

    p = ArgumentParser(prog="python -m families.model_table", description=__doc__.splitlines()[0])
    p.add_argument("--write-readme", action="store_true", help="replace the table in the checkout's README.md")
    args = p.parse_args(argv)
    if not args.write_readme:
        sys.stdout.write(markdown_table())
        return 0
    readme = Path(REPO_ROOT) / "README.md"
    text = readme.read_text(encoding="utf-8")
    if readme_table(text) is None:
        print(f"error: {readme} has no models table markers ({BEGIN} ... {END})", file=sys.stderr)
        return 2
    with atomic_path(readme) as tmp:
        tmp.write_text(with_table(text), encoding="utf-8")
    print(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
