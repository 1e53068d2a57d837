"""Stage 3 on PyTorch (``--backend torch``): the pruned transformer on the GPU through :mod:`runtime.torch_backend`,
as a build (what converted, what did not and why, and an AOTInductor package where one can be written) and as
the diffusers pipeline the benchmark times.

The transformer comes from stage 2's output: its compact checkpoint (``<export>/compact``; heads and neurons of
a structured plan physically removed, the 2:4 zeros of a 2:4 plan in place) with the plan it records. A build
writes ``<out>/torch_<precision>/``: ``torch_report.json`` (settings, GPU, library versions, the layers on 2:4
kernels and those left dense with the reason, the package or why there is none) and ``package/transformer.pt2``
with its manifest (:mod:`runtime.torch_package`). On a host without CUDA, or a GPU the plan and precision
cannot run on, it stops with one line before anything is loaded (:func:`check_torch_build`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError

log = logging.getLogger(__name__)

REPORT = "torch_report.json"


def is_2_4(sparsity) -> bool:
    return sparsity is not None and sparsity.kind == "nm" and (sparsity.n, sparsity.m) == (2, 4)


def export_dir_of(path: str | os.PathLike) -> Path:
    """Stage 2's output directory from it or its ``onnx/``."""
    p = Path(path)
    return p.parent if p.name == "onnx" else p


def load_pruned(export_dir: str | os.PathLike):
    """``(transformer, plan)`` from stage 2's compact checkpoint (float32, CPU); one-line error when missing."""
    from export.checkpoint import DESCRIPTION, load_compact

    compact = export_dir_of(export_dir) / "compact"
    if not (compact / DESCRIPTION).is_file():
        raise UserError(f"no compact checkpoint at {compact}: the torch backend runs stage 2's compact transformer; "
                        "run `python -m pipeline export` first")
    return load_compact(compact)


def check_torch_build(sparsity, export_dir: str | os.PathLike, settings, *, gpu, check_input: bool = True) -> None:
    """Every check of a torch build that loads nothing: the GPU for the plan and precision
    (:func:`runtime.torch_backend.check_hardware`), torchao, and stage 2's compact checkpoint."""
    from runtime.torch_backend import check_hardware, require_torchao

    check_hardware(settings, is_2_4(sparsity), gpu)
    require_torchao()
    if check_input:
        from export.checkpoint import DESCRIPTION

        compact = export_dir_of(export_dir) / "compact"
        if not (compact / DESCRIPTION).is_file():
            raise UserError(f"no compact checkpoint at {compact}; run `python -m pipeline export` first")


def run_torch_build(spec, sparsity, export_dir: str | os.PathLike, out: str | os.PathLike, settings) -> Path:
    """Convert stage 2's transformer for this GPU, package it where AOTInductor can, and write the report into
    ``out/torch_<precision>/``. Returns the report's path."""
    from common.io import sha256_file, write_json
    from export.checkpoint import WEIGHTS
    from runtime.manifest import current_gpu
    from runtime.torch_backend import prepare_transformer
    from runtime.torch_package import package_transformer, running_versions

    gpu = current_gpu()
    check_torch_build(sparsity, export_dir, settings, gpu=gpu)
    model, plan = load_pruned(export_dir)
    # packaged uncompiled: AOTInductor compiles it itself
    model, report = prepare_transformer(model, plan, replace(settings, compile=False), sparse=is_2_4(sparsity), gpu=gpu)
    sh = spec.shapes
    inputs = spec.adapter.transformer_inputs(model, sh.batch_opt, (sh.latent_height, sh.latent_width), sh.text_seq_len, dtype=settings.precision.dtype)
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    target = Path(out) / f"torch_{settings.precision.name}"
    source = export_dir_of(export_dir) / "compact" / WEIGHTS
    packaged = package_transformer(model, inputs, target / "package", gpu=gpu, report=report, source_sha256=sha256_file(source))
    report.update(model=spec.id, sparsity=str(sparsity), source=str(source), versions=running_versions(), **packaged.to_json())
    write_json(target / REPORT, report)
    layers = report["layers"]
    log.info("torch backend: %d layers on 2:4 kernels (%s), %d quantized, %d left dense; package: %s", layers["sparse_layers"],
             layers["kernel"], layers["quantized_dense_layers"], len(layers["refused"]), packaged.path or packaged.reason)
    return target / REPORT


def torch_components(base_pipe, dtype: torch.dtype, device: str = "cuda") -> dict[str, Any]:
    """The pipeline's components with every module but the transformer copied to ``device`` in ``dtype``
    (one copy, shared by the dense and pruned torch pipelines; ``base_pipe`` is left as it was)."""
    import copy

    comps = dict(base_pipe.components)
    for name, module in comps.items():
        if isinstance(module, torch.nn.Module) and name != "transformer":
            comps[name] = copy.deepcopy(module).to(device=device, dtype=dtype)
    return comps


def torch_pipeline(base_pipe, export_dir: str | os.PathLike, settings, *, sparsity, components: dict[str, Any] | None = None, gpu=None,
                   correction=None):
    """``(pipeline, report)``: ``base_pipe``'s class with stage 2's transformer converted by the torch backend
    (compiled per ``settings``), ``components`` (default: :func:`torch_components` of ``base_pipe``) and its own
    copy of the scheduler, to which ``correction`` (a Q-Sched correction or its file) is applied."""
    import copy

    from runtime.manifest import current_gpu
    from runtime.torch_backend import prepare_transformer

    gpu = gpu or current_gpu()
    check_torch_build(sparsity, export_dir, settings, gpu=gpu)
    model, plan = load_pruned(export_dir)
    model, report = prepare_transformer(model, plan, settings, sparse=is_2_4(sparsity), gpu=gpu)
    comps = dict(components if components is not None else torch_components(base_pipe, settings.precision.dtype))
    comps["transformer"] = model
    comps["scheduler"] = copy.deepcopy(comps["scheduler"])
    pipe = type(base_pipe)(**comps)
    if correction is not None:
        from runtime.qsched.apply import apply_correction

        apply_correction(pipe, correction)
    return pipe, report
