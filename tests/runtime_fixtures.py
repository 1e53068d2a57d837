"""Shared, lazily built inputs for the runtime tests: one 2:4-pruned tiny-sd3 export per test session.

Exports go through stage 2's real exporter (:mod:`export.dynamo_export`) and are cached for the session in a
temporary directory (removed at exit), so the TensorRT-RTX, manifest, ONNX Runtime and Triton tests share
them instead of each paying for an export.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

_WORK: list[Path] = []


def workdir() -> Path:
    if not _WORK:
        d = Path(tempfile.mkdtemp(prefix="runtime-tests-"))
        atexit.register(shutil.rmtree, d, True)
        _WORK.append(d)
    return _WORK[0]


def prune_2_4_(module: torch.nn.Module) -> list[str]:
    """Zero the 2 smallest of every 4 consecutive input weights of each ``nn.Linear`` (in place).

    Returns the qualified names of the pruned layers.
    """
    names = []
    with torch.no_grad():
        for name, mod in module.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % 4 == 0:
                w = mod.weight  # (out, in)
                groups = w.abs().reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
                drop = groups.topk(2, dim=-1, largest=False).indices
                mask = torch.ones_like(groups).scatter_(-1, drop, 0.0)
                w.mul_(mask.reshape_as(w))
                names.append(name)
    return names


def tiny_sd3():
    """``(spec, pipe)`` for the embedded tiny-sd3 (skips when models/tiny-sd3 is absent)."""
    from families.registry import resolve_model

    spec = resolve_model("tiny-sd3")
    if not (spec.path / "model_index.json").is_file():
        pytest.skip("models/tiny-sd3 is not built yet (make train-tiny)")
    return spec, _pipe()


@lru_cache(maxsize=1)
def _pipe():
    from families.registry import load_pipeline, resolve_model

    return load_pipeline(resolve_model("tiny-sd3"))


@lru_cache(maxsize=1)
def _pruned_export() -> tuple[Path, torch.nn.Module, tuple[str, ...]]:
    from tests.export_helpers import export_transformer

    spec, pipe = tiny_sd3()
    transformer = copy.deepcopy(pipe.transformer)
    pruned = prune_2_4_(transformer.transformer_blocks)
    onnx_dir = workdir() / "pruned" / "onnx"
    sh = spec.shapes
    export_transformer(transformer, onnx_dir / "transformer.onnx", latent_hw=(sh.latent_height, sh.latent_width), text_seq_len=sh.text_seq_len, parity_batches=())
    return onnx_dir, transformer, tuple(f"transformer_blocks.{n}" for n in pruned)


def pruned_export() -> tuple[Path, torch.nn.Module, tuple[str, ...]]:
    """``(onnx_dir, pruned torch transformer, pruned layer names)``: tiny-sd3's transformer with its blocks
    2:4-pruned, exported float32 to ``onnx_dir/transformer.onnx``."""
    tiny_sd3()
    return _pruned_export()


@lru_cache(maxsize=1)
def _components() -> Path:
    from tests.export_helpers import export_and_check, family_component

    spec, pipe = tiny_sd3()
    onnx_dir, _, _ = pruned_export()
    sh = spec.shapes
    export_and_check(family_component(spec.adapter.name, "text_encoder"), pipe.text_encoder, onnx_dir / "text_encoder.onnx",
                     seq_len=pipe.tokenizer.model_max_length, parity_batches=())
    export_and_check(family_component(spec.adapter.name, "vae_decoder"), pipe.vae, onnx_dir / "vae_decoder.onnx",
                     latent_hw=(sh.latent_height, sh.latent_width), parity_batches=())
    return onnx_dir


def component_exports() -> Path:
    """:func:`pruned_export`'s directory, plus ``text_encoder.onnx`` and ``vae_decoder.onnx`` of tiny-sd3
    (T5 and the second CLIP stay PyTorch in the tests, to keep export time down)."""
    tiny_sd3()
    return _components()


@lru_cache(maxsize=1)
def _rtx_engine() -> Path:
    from runtime.trt.build import build_engine
    from runtime.trt.options import BuildOptions

    spec, _ = tiny_sd3()
    onnx_dir, _, _ = pruned_export()
    sh = spec.shapes
    opts = BuildOptions(batch=(sh.batch_min, sh.batch_opt, sh.batch_max), sparsity="2:4")
    return build_engine(onnx_dir / "transformer.onnx", workdir() / "engines" / "transformer", opts, backend="trtrtx", component="transformer")


def rtx_engine() -> Path:
    """The TensorRT-RTX plan of the pruned transformer (skips without tensorrt_rtx)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")
    return _rtx_engine()


def copy_engine(dst_dir: Path) -> Path:
    """A private copy of the RTX plan and manifest (tests that tamper with files use this)."""
    from runtime.manifest import manifest_path_for

    plan = rtx_engine()
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(plan, dst_dir / plan.name)
    shutil.copy2(manifest_path_for(plan), dst_dir / manifest_path_for(plan).name)
    return dst_dir / plan.name
