"""Every command, driven with bad input of every class: one ``error:`` line, exit 2, no traceback, and the
file tree exactly as it was (nothing created, nothing removed, nothing changed). Each row runs ``python -m``
in its own process, forked from a zygote that imported the libraries once (:mod:`tests.cli_zygote`; 101 rows in
about 45 s on two busy cores, where fresh interpreters took 4 minutes for 77); ``BAD_INPUT_FRESH=1`` starts a fresh
interpreter per row instead.

Table-driven: a new case is one row of ``CASES``. ``{tmp}`` in an argument is the test's directory, which
is also the working directory; ``{ro}`` is a location this user cannot write to. A row's ``setup``
prepares files there first (they are part of the "before" snapshot).
"""

from __future__ import annotations

import contextlib
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


def _store(tmp: Path, *parts: str) -> Path:
    """Directories of an artifact store as the project writes them (each with its marker)."""
    d = tmp / "art"
    for part in ("", *parts):
        d = d / part if part else d
        d.mkdir(exist_ok=True)
        (d / ".sparse-dit-deploy").write_text("written by sparse-dit-deploy\n")
    return d


def engine_list_plan(tmp: Path) -> None:
    """An artifact directory whose stage-1 plan.json is a list: found before any stage runs."""
    prune = _store(tmp, "tiny-sd3", "2-4-obs-diff", "prune")
    (prune / "plan.json").write_text("[1, 2, 3]")


def engine_foreign_onnx(tmp: Path) -> None:
    """The user's own directory where ``make engine`` would put an ONNX directory."""
    onnx = _store(tmp, "tiny-sd3", "dense", "export") / "onnx"
    onnx.mkdir()
    (onnx / "notes.txt").write_text("mine")


def engine_foreign_store(tmp: Path) -> None:
    """A directory of the user's given as the artifact store."""
    (tmp / "art").mkdir()
    (tmp / "art" / "thesis.tex").write_text("mine")


def no_transformer(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def onnx_dir(tmp: Path) -> None:
    (tmp / "onnx").mkdir()


def fake_exports(tmp: Path) -> None:
    """Two export directories as far as the e2e benchmark looks before it writes anything."""
    for which in ("dense", "pruned"):
        (tmp / which / "onnx").mkdir(parents=True)
        (tmp / which / "onnx" / "transformer.onnx").write_bytes(b"")


def truncated_onnx(tmp: Path) -> None:
    """An ONNX file cut in half (a copy interrupted, a full disk): protobuf's DecodeError before."""
    data = _small_onnx(tmp / "whole").read_bytes()
    (tmp / "onnx").mkdir()
    (tmp / "onnx" / "transformer.onnx").write_bytes(data[: len(data) // 2])


def truncated_external_data(tmp: Path) -> None:
    """A complete ONNX graph whose external weights file was cut short."""
    model = _small_onnx(tmp / "onnx", external=True)
    data = tmp / "onnx" / "transformer.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert model.is_file()


def wrong_kind_onnx(tmp: Path) -> None:
    (tmp / "onnx").mkdir()
    (tmp / "onnx" / "transformer.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def _small_onnx(directory: Path, *, external: bool = False) -> Path:
    """A real ONNX model (one MatMul with a 64x64 weight), optionally with its weight in external data."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    model = helper.make_model(graph)
    path = directory / "transformer.onnx"
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="transformer.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _copy_tiny_transformer(tmp: Path) -> Path:
    import shutil

    dst = tmp / "pruned" / "transformer"
    shutil.copytree(REPO / "models" / "tiny-sd3" / "transformer", dst)
    return dst / "diffusion_pytorch_model.safetensors"


def truncated_safetensors(tmp: Path) -> None:
    """A stage-1 transformer whose weights file was cut short."""
    w = _copy_tiny_transformer(tmp)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def float_prune(tmp: Path) -> None:
    """A finished stage-1 directory of tiny-sd3 with float weights (no --weight-bits)."""
    _copy_tiny_transformer(tmp)
    _complete_plan(tmp)


def wrong_kind_safetensors(tmp: Path) -> None:
    w = _copy_tiny_transformer(tmp)
    w.write_text("this is not a weights file\n" * 10)


def truncated_model_dir(tmp: Path) -> None:
    """A local diffusers model directory (a copy of tiny-sd3) whose VAE weights were cut short."""
    import shutil

    shutil.copytree(REPO / "models" / "tiny-sd3", tmp / "sd3")
    w = tmp / "sd3" / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])


def truncated_plan(tmp: Path) -> None:
    (tmp / "pruned" / "transformer").mkdir(parents=True)
    (tmp / "pruned" / "plan.json").write_text('{"version": 2, "model": "tiny-sd3", "sparsity": "2:4", "lay')


def _complete_plan(tmp: Path) -> None:
    """A finished stage-1 plan.json for the truncated transformer beside it (checked before the weights)."""
    import shutil

    shutil.copy(REPO / "tests" / "data" / "plan_v1_tiny_sd3_structured.json", tmp / "pruned" / "plan.json")


def engine_corrupt_manifest(tmp: Path) -> None:
    """An artifact directory whose manifest.json was cut short."""
    cfg = _store(tmp, "tiny-sd3", "2-4-obs-diff")
    (cfg / "manifest.json").write_text('{"model": "tiny-sd3", "stages": {"prune": {"inp')


def huge_prompts(tmp: Path) -> None:
    """A prompt file far larger than any list of prompts (17 MiB)."""
    (tmp / "prompts.txt").write_bytes((b"a handwritten digit 3 " * 47662 + b"\n") * 17)


def binary_prompts(tmp: Path) -> None:
    (tmp / "prompts.txt").write_bytes(bytes(range(256)) * 64)


def lock_holder(tmp: Path) -> None:
    """Another run writing ``{tmp}/p``: a process holding its lock (started here, ended by the test)."""
    import time

    (tmp / "p").mkdir()
    code = ("import sys, time; from common.io import created_dirs\n"
            "with created_dirs(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp / "p")], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    _HOLDERS.append(proc)
    time.sleep(0.1)


def dangling_link(tmp: Path) -> None:
    """``{tmp}/link`` points to ``{tmp}/nowhere``, which does not exist (an unmounted disk, a deleted target)."""
    (tmp / "link").symlink_to(tmp / "nowhere")


def link_loop(tmp: Path) -> None:
    (tmp / "loop1").symlink_to("loop2")
    (tmp / "loop2").symlink_to("loop1")


def flux_pruned(tmp: Path) -> None:
    """A finished tiny-flux stage-1 directory: a real plan (``prune --model tiny-flux --samples 1 --steps 1
    --groups 1``) beside the tiny-flux transformer."""
    import shutil

    shutil.copytree(REPO / "models" / "tiny-flux" / "transformer", tmp / "pruned" / "transformer")
    shutil.copy(REPO / "tests" / "data" / "plan_tiny_flux_2_4.json", tmp / "pruned" / "plan.json")


def sd3_pruned_other_weights(tmp: Path) -> None:
    """A tiny-sd3 stage-1 directory whose plan records weights other than the embedded model's (pruned before
    the model was retrained)."""
    _copy_tiny_transformer(tmp)
    plan = json.loads((REPO / "tests" / "data" / "plan_v1_tiny_sd3_structured.json").read_text())
    (tmp / "pruned" / "plan.json").write_text(json.dumps({**plan, "model_weights": "sha256:" + "0" * 64}))


def _export_report(directory: Path, **fields) -> None:
    report = {"model": "tiny-sd3", "sparsity": "dense", "inputs": {"model_weights": None}, **fields}
    (directory / "export_report.json").write_text(json.dumps(report))


def flux_onnx_dir(tmp: Path) -> None:
    """Stage 2's output as far as build reads it first: its report says tiny-flux."""
    _small_onnx(tmp / "onnx")
    _export_report(tmp, model="tiny-flux")


def sparse_onnx_dir(tmp: Path) -> None:
    """A 2:4 export of tiny-sd3, built as if dense (build's --sparsity default)."""
    _small_onnx(tmp / "onnx")
    _export_report(tmp, sparsity="2:4")


def weight_only_onnx_dir(tmp: Path) -> None:
    """Stage 2's output as far as build reads it first: its report says its CLIP is weight-only INT4 (MatMulNBits)."""
    _small_onnx(tmp / "onnx")
    _export_report(tmp, components={"text_encoder": {"file": "text_encoder.onnx", "precision": "int4", "weight_only": {"bits": 4}}})


def flux_dense_export(tmp: Path) -> None:
    """The e2e benchmark's two exports, the dense one made for tiny-flux."""
    fake_exports(tmp)
    _export_report(tmp / "dense", model="tiny-flux")


def flux_correction(tmp: Path) -> None:
    """A scheduler correction fitted on tiny-flux."""
    fake_exports(tmp)
    corr = {"format": "qsched-correction/1", "steps": 2, "objective": "trajectory", "scheduler": "FlowMatchEulerDiscreteScheduler",
            "model": "tiny-flux", "guidance": 4.0, "sample_coeff": [1.0, 1.0], "model_coeff": [1.0, 1.0], "fit": {}}
    (tmp / "c.json").write_text(json.dumps(corr))


_HOLDERS: list[subprocess.Popen] = []
_MOUNTS: list[Path] = []


def _small_filesystem(tmp: Path, size: str) -> Path:
    """A tmpfs of ``size`` at ``tmp/small`` (needs root and mount rights; the row is skipped otherwise)."""
    mnt = tmp / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full-disk row mounts a small tmpfs: needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()[:200]})")
    _MOUNTS.append(mnt)
    return mnt


def small_disk(tmp: Path) -> None:
    """A 1 MiB file system: smaller than the tiny-sd3 transformer (17 MiB) that prune saves."""
    _small_filesystem(tmp, "1m")


def full_disk(tmp: Path) -> None:
    """A 256 KiB file system already full: the write itself fails (PIL's OSError, caught by atomic_path)."""
    mnt = _small_filesystem(tmp, "256k")
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)


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
    watch_repo_models: bool = False  # also check that the repository's models/ is unchanged
    late: bool = False  # found after the model loaded: the libraries' own start-up warnings may come first


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
    # 7. output directories the project did not write (issue 19)
    Case("prune-out-foreign-dir", [*PRUNE, "--out", "{tmp}/mine"], "did not write", user_dir),
    Case("prune-out-filesystem-root", [*PRUNE, "--out", "/"], "/ is a non-empty directory this project did not write"),
    Case("export-out-foreign-dir", [*EXPORT, "--out", "{tmp}/mine"], "did not write", user_dir),
    Case("build-out-foreign-dir", [*BUILD, "--out", "{tmp}/mine"], "did not write", lambda t: (user_dir(t), onnx_dir(t))),
    Case("prune-out-repository-model", [*PRUNE, "--out", "{repo}/models/tiny-sd3/pruned"], "embedded models", watch_repo_models=True),
    Case("prune-out-repository-models", [*PRUNE, "--out", "{repo}/models"], "embedded models", watch_repo_models=True),
    Case("generate-out-repository-model", [*GEN, "--out", "{repo}/models/tiny-sd3/x.png"], "embedded models", watch_repo_models=True),
    Case("export-out-repository-model", [*EXPORT, "--out", "{repo}/models/tiny-sd3/transformer"], "embedded models", watch_repo_models=True),
    Case("prune-out-empty", [*PRUNE, "--out", ""], "--out: must not be empty"),
    Case("generate-out-empty", [*GEN, "--out", ""], "--out: must not be empty"),
    Case("engine-artifacts-foreign", ENGINE, "{tmp}/art is a non-empty directory this project did not write", engine_foreign_store),
    Case("engine-artifacts-empty", ["pipeline", "engine", "--artifacts", ""], "--artifacts: must not be empty"),
    # 8. corrupt, truncated or wrong-kind inputs: one line naming the file
    Case("build-onnx-truncated", [*BUILD, "--out", "{tmp}/eng"], "cannot read ONNX model {tmp}/onnx/transformer.onnx", truncated_onnx),
    Case("build-onnx-external-data-truncated", [*BUILD, "--out", "{tmp}/eng"], "external data {tmp}/onnx/transformer.onnx.data",
         truncated_external_data),
    Case("build-onnx-wrong-kind", [*BUILD, "--out", "{tmp}/eng"], "{tmp}/onnx/transformer.onnx", wrong_kind_onnx),
    Case("generate-transformer-truncated", [*GEN, "--transformer", "{tmp}/pruned", "--out", "{tmp}/x.png"],
         "{tmp}/pruned/transformer/diffusion_pytorch_model.safetensors is truncated", truncated_safetensors),
    Case("generate-transformer-wrong-kind", [*GEN, "--transformer", "{tmp}/pruned", "--out", "{tmp}/x.png"],
         "is not a safetensors file", wrong_kind_safetensors),
    Case("generate-model-dir-truncated", [*GEN, "--model", "{tmp}/sd3", "--out", "{tmp}/x.png"],
         "{tmp}/sd3/vae/diffusion_pytorch_model.safetensors is truncated", truncated_model_dir),
    Case("export-plan-truncated", [*EXPORT, "--pruned", "{tmp}/pruned", "--out", "{tmp}/out"], "corrupt JSON in {tmp}/pruned/plan.json",
         truncated_plan),
    Case("engine-manifest-truncated", ENGINE, "corrupt JSON in {tmp}/art/tiny-sd3/2-4-obs-diff/manifest.json", engine_corrupt_manifest),
    Case("prune-prompts-binary", [*PRUNE, "--prompts", "{tmp}/prompts.txt", "--out", "{tmp}/p"], "is not UTF-8 text", binary_prompts),
    # 9. huge inputs: what is read is bounded
    Case("prune-prompts-huge", [*PRUNE, "--prompts", "{tmp}/prompts.txt", "--out", "{tmp}/p"], "is larger than 16.0 MiB", huge_prompts),
    # 10. a full disk: one line naming the location, what is free and what the stage needs; nothing half-written
    Case("prune-out-small-disk", [*PRUNE, "--samples", "1", "--steps", "1", "--groups", "1", "--out", "{tmp}/small/p"],
         "the pruned transformer needs about 34.", small_disk),
    Case("export-out-small-disk", [*EXPORT, "--components", "transformer", "--out", "{tmp}/small/e"],
         "the fp32 export of transformer needs about 68.", small_disk, late=True),
    Case("export-pruned-weights-truncated", [*EXPORT, "--pruned", "{tmp}/pruned", "--out", "{tmp}/out"],
         "{tmp}/pruned/transformer/diffusion_pytorch_model.safetensors is truncated", lambda t: (truncated_safetensors(t), _complete_plan(t))),
    Case("generate-out-full-disk", [*GEN, "--steps", "1", "--out", "{tmp}/small/x.png"], "no space left on the device writing {tmp}/small/x.png",
         full_disk, late=True),
    # 11. a model-running check that would not fit in memory: one line naming the option that fits (here none: 1 byte)
    Case("export-parity-does-not-fit", [*EXPORT, "--out", "{tmp}/e", "--components", "transformer"], "pass --parity-batches '' to skip the check",
         env={"SDD_PARITY_BUDGET_BYTES": "1"}, late=True),
    Case("export-parity-memory-zero", [*EXPORT, "--parity-memory", "0", "--out", "{tmp}/e"], "--parity-memory: must be a finite number in (0, inf)"),
    Case("export-parity-memory-below-the-smallest-shape", [*EXPORT, "--parity-memory", "1e-6", "--out", "{tmp}/e", "--components", "transformer"],
         "activations even at a 2x2 latent, over its 1.0 KiB cap: pass a larger --parity-memory", late=True),
    Case("export-parity-batches-empty-is-allowed-but-out-is-not", [*EXPORT, "--parity-batches", "", "--out", ""], "--out: must not be empty"),
    # 12. two runs on one output directory: the second stops naming the first
    Case("prune-out-locked", [*PRUNE, "--samples", "1", "--steps", "1", "--groups", "1", "--out", "{tmp}/p"],
         "{tmp}/p is being written by process", lock_holder),
    # 13. symbolic links that lead nowhere, as an output or above it: refused, never followed nor replaced (issue 23)
    Case("prune-out-dangling-link", [*PRUNE, "--samples", "1", "--steps", "1", "--groups", "1", "--out", "{tmp}/link"],
         "--out: {tmp}/link is a symbolic link to {tmp}/nowhere, which does not exist", dangling_link),
    Case("prune-out-link-loop", [*PRUNE, "--out", "{tmp}/loop1"], "{tmp}/loop1 is a symbolic link that loops", link_loop),
    Case("export-out-under-dangling-link", [*EXPORT, "--out", "{tmp}/link/e"], "{tmp}/link is a symbolic link to", dangling_link),
    Case("build-out-under-link-loop", [*BUILD, "--out", "{tmp}/loop2/eng"], "{tmp}/loop2 is a symbolic link that loops",
         lambda t: (link_loop(t), onnx_dir(t))),
    Case("generate-out-dangling-link", [*GEN, "--out", "{tmp}/link"], "{tmp}/link is a symbolic link to", dangling_link),
    Case("engine-artifacts-dangling-link", ["pipeline", "engine", "--artifacts", "{tmp}/link"], "--artifacts: {tmp}/link is a symbolic link to",
         dangling_link),
    Case("serve-repository-dangling-link", ["pipeline", "serve", "--artifacts", "{tmp}/art", "--repository", "{tmp}/link/r"],
         "--repository: {tmp}/link is a symbolic link to", dangling_link),
    Case("prune-prompts-dangling-link", [*PRUNE, "--prompts", "{tmp}/link", "--out", "{tmp}/p"],
         "prompt file {tmp}/link is a symbolic link that leads to {tmp}/nowhere", dangling_link),
    # 14. an input made for another model: one line naming both, at every hand-off (issue 23)
    Case("export-pruned-other-model", [*EXPORT, "--model", "tiny-sd3", "--pruned", "{tmp}/pruned", "--out", "{tmp}/out"],
         "--pruned {tmp}/pruned was made for tiny-flux (flux, sha256:", flux_pruned),
    Case("export-pruned-other-weights", [*EXPORT, "--pruned", "{tmp}/pruned", "--out", "{tmp}/out"],
         "--pruned {tmp}/pruned was made from other weights of tiny-sd3", sd3_pruned_other_weights),
    Case("generate-transformer-other-model", [*GEN, "--transformer", "{tmp}/pruned", "--out", "{tmp}/x.png"],
         "--transformer {tmp}/pruned/transformer was made for tiny-flux", flux_pruned),
    Case("build-onnx-other-model", [*BUILD, "--out", "{tmp}/eng"], "was made for tiny-flux, not for tiny-sd3; pass --model tiny-flux", flux_onnx_dir),
    Case("build-onnx-other-sparsity", [*BUILD, "--sparsity", "4:8", "--out", "{tmp}/eng"], "holds a 2:4 export ({tmp}/export_report.json), not 4:8", sparse_onnx_dir),
    Case("e2e-export-other-model", [*E2E, "--out", "{tmp}/b"], "was made for tiny-flux, not for tiny-sd3", flux_dense_export),
    Case("e2e-correction-other-model", [*E2E, "--out", "{tmp}/b", "--correction", "{tmp}/c.json"],
         "the scheduler correction was fitted on tiny-flux, not on tiny-sd3", flux_correction),
    # 15. sizes no engine could hold (issue 23)
    Case("export-batch-beyond-any-engine", [*EXPORT, "--batch", "1:1:100000", "--out", "{tmp}/e"],
         "--batch 1:1:100000: the max batch can be at most 58,254: one batch item of tiny-sd3's transformer at 32x32 px"),
    Case("export-resolution-beyond-any-engine", [*EXPORT, "--model", "tiny-flux", "--resolution", "16384x16384", "--out", "{tmp}/e"],
         "--resolution 16384x16384 px: too large for any engine"),
    # 16. counts and kinds the model or the file system contradicts (issue 23)
    Case("prune-groups-beyond-units", [*PRUNE, "--groups", "1000", "--out", "{tmp}/p"],
         "--groups 1000: tiny-sd3 has 16 prunable units (parallel layers of one block that see the same input) in blocks 0..3"),
    Case("prune-last-block-beyond-model", [*PRUNE, "--last-block", "9", "--out", "{tmp}/p"], "block range 0..9 is outside 0..3"),
    Case("prune-prompts-is-dir", [*PRUNE, "--prompts", "{tmp}/mine", "--out", "{tmp}/p"], "prompt file {tmp}/mine is a directory, not a file", user_dir),
    Case("export-calib-prompts-is-dir", [*EXPORT, "--precision", "int8", "--calib-prompts", "{tmp}/mine", "--out", "{tmp}/e"],
         "prompt file {tmp}/mine is a directory, not a file", user_dir),
    Case("e2e-correction-is-dir", [*E2E, "--out", "{tmp}/b", "--correction", "{tmp}/mine"], "scheduler correction {tmp}/mine is a directory",
         lambda t: (fake_exports(t), user_dir(t))),
    Case("build-onnx-dir-is-file", ["pipeline", "build", "--onnx-dir", "{tmp}/afile", "--out", "{tmp}/eng"], "--onnx-dir {tmp}/afile is not a directory",
         regular_file),
    Case("export-share-from-is-file", [*EXPORT, "--share-from", "{tmp}/afile", "--out", "{tmp}/e"], "--share-from {tmp}/afile is not a directory",
         regular_file),
    # 17. 4-bit weights exported from a prune that did not solve them (issue 24)
    Case("export-int4-without-pruned", [*EXPORT, "--precision", "int4", "--out", "{tmp}/e"],
         "--precision int4 exports the 4-bit weights stage 1 solved, and no --pruned was given: prune with --weight-bits 4"),
    Case("export-int4-float-prune", [*EXPORT, "--precision", "int4", "--pruned", "{tmp}/pruned", "--out", "{tmp}/e"],
         "--pruned {tmp}/pruned holds float weights (a prune without --weight-bits): prune with --weight-bits 4", float_prune),
    Case("engine-int4-calibration", [*ENGINE, "--precision", "int4", "--quant-samples", "2"],
         "--quant-samples/--quant-calls calibrate an INT8/FP8 transformer"),
    Case("export-w4a16-float-prune", [*EXPORT, "--precision", "w4a16", "--pruned", "{tmp}/pruned", "--out", "{tmp}/e"],
         "--pruned {tmp}/pruned holds float weights (a prune without --weight-bits): prune with --weight-bits 4", float_prune),
    # 18. compressed text encoders (issue 24): weight-only values, T5 where the family needs it, engines of ONNX Runtime graphs
    Case("export-others-precision-unknown", [*EXPORT, "--others-precision", "int3", "--out", "{tmp}/e"], "--others-precision: invalid choice: 'int3'"),
    Case("export-drop-t5-flux", [*EXPORT, "--model", "tiny-flux", "--drop-t5", "--out", "{tmp}/e"],
         "tiny-flux cannot run without its T5 encoder (the flux transformer is conditioned on T5's tokens"),
    Case("export-drop-t5-and-export-it", [*EXPORT, "--drop-t5", "--components", "transformer,text_encoder_3", "--out", "{tmp}/e"],
         "--drop-t5 leaves text_encoder_3 out of the pipeline; remove it from --components"),
    Case("engine-drop-t5-flux", [*ENGINE, "--model", "tiny-flux", "--drop-t5"], "tiny-flux cannot run without its T5 encoder"),
    Case("build-weight-only-encoder", [*BUILD, "--out", "{tmp}/eng"], "text_encoder in {tmp}/onnx: weight-only INT8/INT4 text encoders for ONNX Runtime",
         weight_only_onnx_dir),
    Case("encoder-quality-flux-without-t5", ["benchmarks.encoder_quality", "--model", "tiny-flux", "--variants", "int8-no-t5", "--out", "{tmp}/q.json"],
         "unknown variant(s) int8-no-t5; choose from fp32, int8, int4 (tiny-flux needs its T5 encoder: no -no-t5 variant)"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind and content hash (a symbolic link: where it points, not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(arg: str, tmp: Path) -> str:
    return arg.replace("{tmp}", str(tmp)).replace("{ro}", readonly_dir()).replace("{repo}", str(REPO))


@pytest.fixture
def stop_holders():
    yield
    while _HOLDERS:
        p = _HOLDERS.pop()
        p.kill()
        p.wait()
    while _MOUNTS:
        subprocess.run(["umount", str(_MOUNTS.pop())], check=False)


@pytest.fixture(scope="session")
def cli():
    """Runs ``python -m <argv>``: in a child forked from a zygote that imported the libraries once (see
    :mod:`tests.cli_zygote`), or, with ``BAD_INPUT_FRESH=1``, in a fresh interpreter each time."""
    if os.environ.get("BAD_INPUT_FRESH"):
        yield lambda argv, cwd, env: subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return
    from tests.cli_zygote import Zygote

    z = Zygote(REPO).start({**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    yield lambda argv, cwd, env: z.run(argv, cwd=cwd, env=env)
    z.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, stop_holders, cli):
    if case.setup is not None:
        case.setup(tmp_path)
    before = _snapshot(tmp_path)
    models_before = _snapshot(REPO / "models") if case.watch_repo_models else None
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), **case.env}
    r = cli([_fill(a, tmp_path) for a in case.argv], tmp_path, env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case.late:
        lines = lines[-1:] if sum(line.startswith("error:") for line in lines) == 1 else lines
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-3000:]
    assert _fill(case.expect, tmp_path) in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "the command created, removed or changed files"
    if models_before is not None:
        assert _snapshot(REPO / "models") == models_before, "the command wrote into the repository's models/"
