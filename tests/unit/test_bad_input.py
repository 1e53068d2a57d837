"""Every command, driven with bad input of every class: one ``error:`` line, exit 2, no traceback, and the
file tree exactly as it was (nothing created, nothing removed, nothing changed).

Table-driven: a new case is one row of ``CASES``. ``{tmp}`` in an argument is the test's directory, which
is also the working directory; ``{ro}`` is a location this user cannot write to. A row's ``setup``
prepares files there first (they are part of the "before" snapshot).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]


# -- fixtures a row can ask for -----------------------------------------------------------------------------
def user_dir(tmp: Path) -> None:
    """A directory of the user's, with a file in it, where an output file is asked for."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "precious.txt").write_text("do not delete")


def regular_file(tmp: Path) -> None:
    (tmp / "afile").write_text("a file, not a directory")


def list_plan(tmp: Path) -> None:
    """A stage-1 directory whose plan.json parses but is a list."""
    (tmp / "pruned" / "transformer").mkdir(parents=True)
    (tmp / "pruned" / "plan.json").write_text(json.dumps([1, 2, 3]))


def latin1_prompts(tmp: Path) -> None:
    (tmp / "prompts.txt").write_bytes("une photo d'un caf\xe9\n".encode("latin-1"))


def empty_prompts(tmp: Path) -> None:
    (tmp / "prompts.txt").write_text("\n  \n")


def engine_list_plan(tmp: Path) -> None:
    """An artifact directory whose stage-1 plan.json is a list: found before any stage runs."""
    prune = tmp / "art" / "tiny-sd3" / "2-4-obs-diff" / "prune"
    prune.mkdir(parents=True)
    (prune / "plan.json").write_text("[1, 2, 3]")


def engine_foreign_onnx(tmp: Path) -> None:
    """The user's own directory where ``make engine`` would put an ONNX directory."""
    onnx = tmp / "art" / "tiny-sd3" / "dense" / "export" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / "notes.txt").write_text("mine")


def no_transformer(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def onnx_dir(tmp: Path) -> None:
    (tmp / "onnx").mkdir()


def fake_exports(tmp: Path) -> None:
    """Two export directories as far as the e2e benchmark looks before it writes anything."""
    for which in ("dense", "pruned"):
        (tmp / which / "onnx").mkdir(parents=True)
        (tmp / which / "onnx" / "transformer.onnx").write_bytes(b"")


def readonly_dir() -> str:
    """A location this user cannot create files in (root ignores file modes, not sysfs)."""
    return "/sys/sdd-test" if os.geteuid() == 0 else "/proc/sdd-test"


@dataclass
class Case:
    id: str
    argv: list[str]  # after `python -m`
    expect: str  # substring of the error line
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


GEN = ["pipeline", "generate", "--prompt", "a handwritten digit 3"]
QUALITY = ["benchmarks.quality"]
E2E = ["benchmarks.e2e", "--dense", "{tmp}/dense", "--pruned", "{tmp}/pruned"]
ENGINE = ["pipeline", "engine", "--artifacts", "{tmp}/art"]
PRUNE = ["pipeline", "prune"]
EXPORT = ["pipeline", "export"]
BUILD = ["pipeline", "build", "--onnx-dir", "{tmp}/onnx"]

CASES = [
    # 1. data loss: an output file where a directory of the user's is
    Case("generate-out-is-user-dir", [*GEN, "--out", "{tmp}/mine"], "is a directory", user_dir),
    Case("quality-json-is-user-dir", [*QUALITY, "--json", "{tmp}/mine"], "is a directory", user_dir),
    Case("sheet-out-is-user-dir", ["pipeline", "sheet", "--out", "{tmp}/mine"], "is a directory", user_dir),
    Case("engine-foreign-onnx-dir", [*ENGINE, "--no-engines"], "did not write", engine_foreign_onnx),
    # 2. tracebacks: outputs that cannot be written
    Case("prune-out-is-file", [*PRUNE, "--out", "{tmp}/afile"], "not a directory", regular_file),
    Case("export-out-readonly", [*EXPORT, "--out", "{ro}/out"], "cannot write"),
    Case("generate-out-readonly", [*GEN, "--out", "{ro}/x.png"], "cannot write"),
    Case("quality-json-readonly", [*QUALITY, "--json", "{ro}/q.json"], "cannot write"),
    Case("e2e-out-readonly", [*E2E, "--out", "{ro}/bench"], "cannot write", fake_exports),
    Case("build-out-readonly", [*BUILD, "--out", "{ro}/engines"], "cannot write", onnx_dir),
    Case("prune-out-readonly", [*PRUNE, "--out", "{ro}/p"], "cannot write"),
    Case("engine-artifacts-is-file", ["pipeline", "engine", "--artifacts", "{tmp}/afile"], "not a directory", regular_file),
    # 2. tracebacks: JSON of the wrong shape, text that is not UTF-8
    Case("export-plan-is-list", [*EXPORT, "--pruned", "{tmp}/pruned", "--out", "{tmp}/out"], "JSON list", list_plan),
    Case("engine-plan-is-list", ENGINE, "JSON list", engine_list_plan),
    Case("prune-prompts-latin1", [*PRUNE, "--prompts", "{tmp}/prompts.txt", "--out", "{tmp}/p"], "not UTF-8", latin1_prompts),
    Case("prune-prompts-empty", [*PRUNE, "--prompts", "{tmp}/prompts.txt", "--out", "{tmp}/p"], "prompt list is empty", empty_prompts),
    # 2. tracebacks: numbers out of range
    Case("prune-height-negative", [*PRUNE, "--height", "-32", "--out", "{tmp}/p"], "--height: must be at least 1"),
    Case("prune-height-not-multiple", [*PRUNE, "--height", "33", "--out", "{tmp}/p"], "multiple of 8"),
    Case("prune-width-too-big", [*PRUNE, "--width", "128", "--out", "{tmp}/p"], "at most 64"),
    Case("prune-steps-negative", [*PRUNE, "--steps", "-1", "--out", "{tmp}/p"], "--steps: must be at least 1"),
    Case("prune-percdamp", [*PRUNE, "--percdamp", "0", "--out", "{tmp}/p"], "--percdamp"),
    Case("prune-blocks-reversed", [*PRUNE, "--first-block", "3", "--last-block", "1", "--out", "{tmp}/p"], "before --first-block"),
    Case("generate-steps-negative", [*GEN, "--steps", "-1", "--out", "{tmp}/x.png"], "--steps: must be at least 1"),
    Case("generate-seed-word", [*GEN, "--seed", "abc", "--out", "{tmp}/x.png"], "expected an integer"),
    Case("quality-seeds-zero", [*QUALITY, "--seeds", "0", "--json", "{tmp}/q.json"], "--seeds: must be at least 1"),
    Case("sheet-seeds-zero", ["pipeline", "sheet", "--seeds", "0", "--out", "{tmp}/s.png"], "--seeds: must be between"),
    Case("engine-threads-negative", [*ENGINE, "--threads", "-4"], "--threads: must be at least 1"),
    Case("e2e-threads-negative", [*E2E, "--out", "{tmp}/b", "--threads", "-4"], "--threads: must be at least 1"),
    Case("build-workspace-negative", [*BUILD, "--workspace-mib", "-5"], "--workspace-mib: must be at least 1", onnx_dir),
    Case("build-target-cc-word", [*BUILD, "--target-cc", "9.0,abc"], "--target-cc: expected compute capabilities", onnx_dir),
    Case("build-opt-level", [*BUILD, "--opt-level", "9"], "--opt-level: must be between 0 and 5", onnx_dir),
    # 3. silently wrong: --steps 0 used to become the default
    Case("generate-steps-zero", [*GEN, "--steps", "0", "--out", "{tmp}/x.png"], "--steps: must be at least 1"),
    Case("quality-steps-zero", [*QUALITY, "--steps", "0", "--json", "{tmp}/q.json"], "--steps: must be at least 1"),
    Case("e2e-steps-zero", [*E2E, "--out", "{tmp}/b", "--steps", "0"], "--steps: must be at least 1"),
    # 4. late validation: every option of every stage is checked before the first stage runs
    Case("engine-runs-zero", [*ENGINE, "--runs", "0"], "--runs: must be at least 1"),
    Case("engine-warmup-negative", [*ENGINE, "--warmup", "-1"], "--warmup: must be at least 0"),
    Case("engine-opt-level", [*ENGINE, "--opt-level", "9"], "--opt-level: must be between 0 and 5"),
    Case("engine-calib-steps", [*ENGINE, "--calib-steps", "-2"], "argument --calib-steps"),
    Case("engine-triton-is-file", [*ENGINE, "--triton", "{tmp}/afile"], "not a directory", regular_file),
    # 5. leftovers: a failing command leaves no --out behind
    Case("export-missing-pruned", [*EXPORT, "--pruned", "{tmp}/nope", "--out", "{tmp}/out"], "not a directory"),
    Case("e2e-missing-exports", [*E2E, "--out", "{tmp}/bench"], "no transformer.onnx"),
    Case("build-missing-onnx", ["pipeline", "build", "--onnx-dir", "{tmp}/nope", "--out", "{tmp}/eng"], "does not exist"),
    # 6. help that lies: what --transformer and --model accept
    Case("generate-transformer-missing", [*GEN, "--transformer", "{tmp}/nope", "--out", "{tmp}/x.png"], "does not exist"),
    Case("generate-transformer-empty", [*GEN, "--transformer", "{tmp}/empty", "--out", "{tmp}/x.png"], "holds no transformer", no_transformer),
    Case("quality-model-path-missing", [*QUALITY, "--model", "{tmp}/sd3", "--json", "{tmp}/q.json"], "no such directory"),
    Case("generate-model-unknown", [*GEN, "--model", "sd9", "--out", "{tmp}/x.png"], "unknown model 'sd9'"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(arg: str, tmp: Path) -> str:
    return arg.replace("{tmp}", str(tmp)).replace("{ro}", readonly_dir())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    if case.setup is not None:
        case.setup(tmp_path)
    before = _snapshot(tmp_path)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), **case.env}
    r = subprocess.run([sys.executable, "-m", *[_fill(a, tmp_path) for a in case.argv]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-3000:]
    assert case.expect in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "the command created, removed or changed files"
