"""Run a diffusers pipeline (SD3, Flux...) with exported components on ONNX Runtime, OpenVINO or TensorRT.

The pipeline object is diffusers' own: tokenizers, scheduler, latents (from the seed), classifier-free
guidance and image post-processing are unchanged, so images are comparable with the PyTorch pipeline
for the same prompt and seed. Only the networks are swapped, for small ``torch.nn.Module`` adapters that
expose what the pipeline reads (``config``, ``dtype``, ``device``, the call signature and output layout)
and call an :class:`runtime.ort.OrtModel` or :class:`runtime.trt.engine.TrtEngine`:

each component's runtime module, and the pipeline attribute it replaces, come from the family's component
descriptions (:mod:`families.components`).

Components without an ONNX/engine stay PyTorch. :func:`generate` can time the stages with
:mod:`runtime.stage_timer`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from common.errors import UserError
from families import ADAPTERS, adapter_for
from families.components import component_names
from runtime.stage_timer import StageTimer, instrument

log = logging.getLogger(__name__)

Runner = Callable[[dict[str, Any]], dict[str, Any]]

# Every component name some family exports, in a stable order (the files a directory may hold).
KNOWN_COMPONENTS = component_names(ADAPTERS.values())


# ---------------------------------------------------------------------------------------------- loading


def load_runners(
    *,
    backend: str = "ort",
    onnx_dir: str | os.PathLike | None = None,
    engine_dir: str | os.PathLike | None = None,
    provider: str = "cpu",
    components: list[str] | None = None,
    threads: int = 0,
    ov_precision: str = "auto",
) -> dict[str, Runner]:
    """Runners for the exported components.

    backend ``"ort"``: an :class:`~runtime.ort.OrtModel` per ``onnx_dir/<component>.onnx`` (``provider``
    cpu/cuda/auto, ``threads`` intra-op threads, 0 = one per core). backend ``"trt"``: a :class:`~runtime.trt.engine.TrtEngine` per ``engine_dir/<component>/``
    plan of the installed TensorRT(-RTX), checked against ``onnx_dir/<component>.onnx`` when given.
    backend ``"openvino"``: an :class:`~runtime.openvino.session.OvModel` per ``onnx_dir/<component>.onnx`` compiled for
    this CPU at ``ov_precision`` (auto/f32/bf16), or, where ``engine_dir/<component>/`` holds them, that build's checked
    compiled models (``build --backend openvino``), ``threads`` inference threads either way.
    components: default every component found; a named missing one is an error.
    """
    names = list(components) if components is not None else list(KNOWN_COMPONENTS)
    unknown = [c for c in names if c not in KNOWN_COMPONENTS]
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_COMPONENTS)}")
    runners: dict[str, Runner] = {}
    if backend == "ort":
        if onnx_dir is None:
            raise UserError("the ONNX Runtime backend needs an ONNX directory (stage 2's onnx/)")
        from runtime.ort import OrtModel

        for c in names:
            path = Path(onnx_dir) / f"{c}.onnx"
            if path.is_file():
                runners[c] = OrtModel(path, provider=provider, intra_op_threads=threads)
            elif components is not None:
                raise UserError(f"missing {path}; run `python -m pipeline export` first")
    elif backend == "trt":
        if engine_dir is None:
            raise UserError("the TensorRT backend needs an engine directory (from `python -m pipeline build`)")
        from runtime.trt.engine import EngineSet, TrtEngine
        from runtime.trt.plans import find_plan

        static = sorted(p for p in (Path(engine_dir) / "static").glob("*") if p.is_dir())
        for c in names:
            cdir = Path(engine_dir) / c
            src = Path(onnx_dir) / f"{c}.onnx" if onnx_dir is not None else None
            src = src if src is not None and src.is_file() else None
            if any((d / c).is_dir() for d in static):  # build --static-shapes: one engine per resolution
                runners[c] = EngineSet({d.name: TrtEngine(find_plan(d / c), onnx_path=src) for d in static if (d / c).is_dir()})
                continue
            if not cdir.is_dir():
                if components is not None:
                    raise UserError(f"no engine for {c} in {engine_dir}; run `python -m pipeline build` first")
                continue
            runners[c] = TrtEngine(find_plan(cdir), onnx_path=src)
    elif backend == "openvino":
        if onnx_dir is None and engine_dir is None:
            raise UserError("the OpenVINO backend needs an ONNX directory (stage 2's onnx/) or a `build --backend openvino` directory")
        from runtime.openvino.build import load_compiled
        from runtime.openvino.precision import resolve_hint
        from runtime.openvino.session import OvModel

        hint = resolve_hint(ov_precision)
        for c in names:
            src = Path(onnx_dir) / f"{c}.onnx" if onnx_dir is not None else None
            if engine_dir is not None and (Path(engine_dir) / c).is_dir():
                runners[c] = load_compiled(Path(engine_dir) / c, onnx_path=src if src is not None and src.is_file() else None, hint=hint, threads=threads)
            elif src is not None and src.is_file():
                runners[c] = OvModel(src, hint=hint, threads=threads)
            elif components is not None:
                raise UserError(f"missing {src or Path(engine_dir) / c}; run `python -m pipeline export` (and `build --backend openvino`) first")
    else:
        raise UserError(f"unknown runtime backend {backend!r}; use ort, trt or openvino")
    if "transformer" not in runners and components is None:
        raise UserError(f"no transformer found for backend {backend} in {engine_dir if backend == 'trt' else onnx_dir}")
    return runners


def with_runners(pipe, runners: dict[str, Runner], *, device: torch.device | str | None = None, dropped: Sequence[str] = ()):
    """A new pipeline of ``pipe``'s class sharing its tokenizers, scheduler config and untouched modules,
    with each component in ``runners`` replaced by its adapter, and each in ``dropped`` (stage 2's ``--drop-t5``)
    and its tokenizer set to None. ``pipe`` itself is not modified."""
    import copy

    device = torch.device(device) if device is not None else pipe.device
    adapter = adapter_for(pipe.transformer)
    kinds = {c.name: c for c in adapter.components}
    comps = dict(pipe.components)
    for name in dropped:  # diffusers' SD3 pipeline runs with text_encoder_3=None (zeros in place of T5's tokens)
        if name in runners or name not in kinds:
            raise UserError(f"the export left {name} out of the pipeline, yet a runner for it was given")
        comps[kinds[name].attr] = comps[kinds[name].tokenizer_attr] = None
    for name, runner in runners.items():
        if name not in kinds:
            raise UserError(f"{type(pipe).__name__} has no component {name!r} to replace (its components: {', '.join(kinds)})")
        attr = kinds[name].attr
        orig = comps.get(attr)
        if orig is None:
            raise UserError(f"the pipeline has no {attr} to replace with the exported {name}")
        dtype = getattr(orig, "dtype", torch.float32)
        cls = kinds[name].runtime_module(adapter)
        comps[attr] = cls(runner, orig.config, dtype, device)
    comps["scheduler"] = copy.deepcopy(pipe.scheduler)  # schedulers keep per-call state
    new = type(pipe)(**comps)
    new.set_progress_bar_config(disable=True)
    return new


def export_dropped(onnx_dir: str | os.PathLike | None) -> tuple[str, ...]:
    """The components stage 2 left out of the pipeline whose ONNX directory is ``onnx_dir`` (its report's ``dropped``:
    SD3's T5 after ``--drop-t5``); ``()`` without a report."""
    from common.io import read_json

    report = Path(onnx_dir).parent / "export_report.json" if onnx_dir is not None else None
    return tuple(read_json(report, what="export report").get("dropped") or ()) if report is not None and report.is_file() else ()


def check_runner_inputs(spec, *, onnx_dir: str | os.PathLike | None = None, engine_dir: str | os.PathLike | None = None,
                        correction=None):
    """One line, before anything loads, when the exports, engines or scheduler correction were made for another
    model than ``spec`` (stage 2's report beside ``onnx_dir``, the engine manifests under ``engine_dir``, the
    correction's recorded model). Returns the correction loaded (:func:`runtime.qsched.correction.load_correction`:
    a JSON path is read once), or None."""
    if correction is not None:  # a bad file fails before anything is loaded
        from runtime.qsched.correction import load_correction

        correction = load_correction(correction)
        correction.check_model(spec)
    if onnx_dir is not None:
        from export.fingerprint import check_export_for

        check_export_for(onnx_dir, spec, option="ONNX directory")
    if engine_dir is not None and Path(engine_dir).is_dir():
        from runtime.manifest import check_engines_model

        check_engines_model(engine_dir, spec)
    return correction


def runner_pipeline(
    spec,
    *,
    backend: str = "ort",
    onnx_dir: str | os.PathLike | None = None,
    engine_dir: str | os.PathLike | None = None,
    provider: str = "cpu",
    components: list[str] | None = None,
    base_pipe=None,
    device: str | None = None,
    threads: int = 0,
    correction=None,
    dropped: Sequence[str] | None = None,
    ov_precision: str = "auto",
):
    """Load ``spec``'s PyTorch pipeline (or reuse ``base_pipe``) and swap in ORT sessions / TRT engines.

    Without ``base_pipe``, the components the runners replace are built without weights
    (:func:`families.registry.load_pipeline`'s ``without_weights``): the process never holds their PyTorch copies.
    device: where latents and remaining PyTorch modules live (default ``cuda`` for ``trt``, else ``cpu``).
    correction: a :class:`runtime.qsched.correction.SchedulerCorrection` (or its JSON path) that the new pipeline's scheduler
    applies (:func:`runtime.qsched.apply.apply_correction`; the base pipeline is left as it was).
    dropped: the components the pipeline runs without (None: those stage 2's report beside ``onnx_dir`` left out,
    :func:`export_dropped`; SD3 without T5 runs with ``text_encoder_3=None``).
    ov_precision: backend ``"openvino"``'s precision hint (:func:`load_runners`).
    Returns the new pipeline; ``pipe.runners`` holds the runners (for sizes and providers).
    """
    from families.registry import load_pipeline

    correction = check_runner_inputs(spec, onnx_dir=onnx_dir, engine_dir=engine_dir, correction=correction)
    device = device or ("cuda" if backend == "trt" else "cpu")
    runners = load_runners(backend=backend, onnx_dir=onnx_dir, engine_dir=engine_dir, provider=provider, components=components, threads=threads,
                           ov_precision=ov_precision)
    dropped = tuple(dropped) if dropped is not None else export_dropped(onnx_dir)
    if base_pipe is None:
        attrs = {c.name: c.attr for c in spec.adapter.components}
        pipe = with_runners(load_pipeline(spec, without_weights=[attrs[c] for c in runners if c in attrs], drop_t5=bool(dropped)), runners,
                            device=device, dropped=dropped)
        for module in pipe.components.values():  # the PyTorch modules left (RuntimeModules hold no tensors)
            if isinstance(module, torch.nn.Module):
                module.to(device)
    else:
        base = base_pipe if base_pipe.device == torch.device(device) else base_pipe.to(device)
        pipe = with_runners(base, runners, device=device, dropped=dropped)
    pipe.runners = runners
    if correction is not None:
        from runtime.qsched.apply import apply_correction

        apply_correction(pipe, correction)
    return pipe


def generate(pipe, spec, prompts: str | list[str], *, seed: int = 0, steps: int | None = None, guidance: float | None = None, timer: StageTimer | None = None, output_type: str = "pil", **kwargs):
    """Run ``pipe`` with ``spec``'s defaults (steps, guidance, size, T5 length) through :func:`families.sampling.sample`.

    Every prompt starts from the noise of a CPU ``torch.Generator`` seeded with ``seed`` (one per image), so a
    (prompt, seed) gives the same image on every backend and device and in any batch. With ``timer``, per-stage
    times are added to it (plus ``total``). Returns the images (PIL for ``output_type="pil"``, an (N, H, W, 3)
    float array for ``"np"``).
    """
    from families.sampling import sample

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    run = lambda: sample(pipe, spec, prompts, [seed] * len(prompts), steps=steps, guidance=guidance, batch_size=max(len(prompts), 1),  # noqa: E731
                         output_type=output_type, **kwargs)
    if timer is None:
        return run()
    with instrument(pipe, timer):
        timer.start("total")
        try:
            return run()
        finally:
            timer.stop("total")
