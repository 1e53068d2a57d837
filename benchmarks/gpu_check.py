"""GPU check: the torch backend's kernels on SD3-medium and Flux.1-dev shapes, in one run of a few minutes.

    python -m benchmarks.gpu_check --out DIR [--wheels DIR] [--budget-s 390] [--dry-run]
    make gpu-check OUT=DIR [WHEELS=DIR] [DRY_RUN=1]

Needs nothing but a CUDA build of PyTorch: diffusers and torchao, when missing, are installed from a local wheel
folder (``--wheels``, written by ``make gpu-wheels`` on a connected machine) into a temporary directory. Then, writing
``gpu_check.json`` and ``gpu_check.md`` into ``--out`` after every phase (a run cut off still returns what it
measured):

1. the environment (GPU, CUDA, PyTorch, cuSPARSELt, torchao and whether its SM90 kernels loaded);
2. the GPU tests (``tests/gpu``): passed, failed, and skipped with their reasons (no TensorRT is a skip);
3. per model (``sd3-medium``, ``flux.1-dev``): a random-weight transformer of the published config built on the GPU
   in bfloat16 (no download); variants dense, 2:4 (magnitude, for timing), structured 0.3 (cut), INT8, FP8,
   FP8 + 2:4 (INT8 + 2:4 where torchao offers it), built through :mod:`runtime.torch_backend`, and for SD3-medium
   INT4 weight-only (group 128: torchao's tinygemm tensors built from codes on stage 1's grid by
   :mod:`runtime.torch_int4`, each layer checked against its dequantized weight, and how many of those codes
   torchao's own quantizer would keep); one denoising
   step at 1024x1024 with the model's CFG batch, timed with CUDA events, variants interleaved round by round,
   eager and then compiled (``torch.compile``) in priority order while the budget allows (the report says
   which); per variant the median and spread, the ratio to dense bf16 (compiled when it was), the share of
   GEMM kernel time in sparse kernels (torch.profiler, by kernel name), weight bytes and activation peak; for
   Flux.1-dev, 28 steps of the transformer next to the published diffusers-torchao figures.

``--dry-run`` runs the same program on the CPU with tiny configs of the same families (one block of each kind)
at 64x64: layers are chosen but not converted (the kernels need CUDA), nothing is compiled, and the JSON says so.
INT4 converts there too, on PyTorch's CPU tinygemm kernel (the same format; the CUDA kernel is skipped, and said so).
"""

from __future__ import annotations

import copy
import importlib.metadata as metadata
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("benchmarks.gpu_check")

MODELS = ("sd3-medium", "flux.1-dev")
# Built in this order; compiled in COMPILE_ORDER while the budget lasts.
VARIANTS = ("dense bf16", "2:4 bf16", "structured 0.3", "int8", "fp8", "fp8 + 2:4", "int4 wo")
COMPILE_ORDER = ("dense bf16", "2:4 bf16", "fp8 + 2:4", "fp8", "int8", "structured 0.3", "int4 wo")
INT4 = "int4 wo"  # INT4 weight-only (runtime.torch_int4), group INT4_GROUP, on the models of INT4_MODELS only (the budget)
INT4_GROUP = 128
INT4_MODELS = ("sd3-medium",)
BASELINE = "dense bf16"
# diffusers-torchao (github.com/sayakpaul/diffusers-torchao), Flux.1-dev, 1024x1024, 28 steps, batch 1, one H100,
# the whole pipeline (text encoders and VAE included), seconds.
PUBLISHED_FLUX = {"bf16 eager": 6.57, "bf16 compiled": 4.21, "int8 dynamic + compile": 3.41, "fp8 dynamic + compile": 3.24}
FLUX_STEPS = 28
NEEDS = ("diffusers", "torchao")


# --------------------------------------------------------------------------------------------------------
# Dependencies from a wheel folder
# --------------------------------------------------------------------------------------------------------


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def install_missing(wheels: Path | None) -> dict[str, Any]:
    """Install the wheels in ``wheels`` whose distributions are not installed, into a temporary directory put
    first on ``sys.path`` and ``PYTHONPATH`` (for the test subprocess). Returns what was installed."""
    missing = []
    for name in NEEDS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if not missing:
        return {"installed": [], "from": None}
    files = sorted(Path(wheels).glob("*.whl")) if wheels and Path(wheels).is_dir() else []
    if not files:
        from common.errors import UserError

        raise UserError(f"{', '.join(missing)} not installed and no wheel folder ({wheels or 'none given'}): run `make gpu-wheels` on a "
                        "connected machine and pass WHEELS=DIR (--wheels DIR)")
    have = set()
    for f in files:
        try:
            metadata.version(_dist_name(f))
            have.add(f)
        except metadata.PackageNotFoundError:
            pass
    todo = [f for f in files if f not in have]
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site),
                    *map(str, todo)], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    metadata.distributions.cache_clear() if hasattr(metadata.distributions, "cache_clear") else None
    return {"installed": [f.name for f in todo], "from": str(wheels), "site": str(site)}


# --------------------------------------------------------------------------------------------------------
# Results, written after every phase
# --------------------------------------------------------------------------------------------------------


class Results:
    """The report as it grows: ``save()`` rewrites ``gpu_check.json`` and ``gpu_check.md`` atomically."""

    def __init__(self, out: Path, data: dict[str, Any]):
        self.out = out
        self.data = data

    def save(self) -> None:
        from common.report import write_report

        self.data["elapsed_s"] = round(time.monotonic() - self.data["_t0"], 1)
        write_report(self.out / "gpu_check.json", {k: v for k, v in self.data.items() if not k.startswith("_")}, render_markdown(self.data))


def environment(device: str) -> dict[str, Any]:
    import torch

    from common.versions import library_versions
    from runtime.manifest import current_gpu
    from runtime.torch_backend import fp8_sparse_kernel_loaded

    env: dict[str, Any] = {"versions": library_versions(["torch", "torchao", "diffusers", "transformers", "tensorrt"]),
                           "device": device, "cuda": torch.version.cuda}
    gpu = current_gpu()
    env["gpu"] = gpu.to_dict() if gpu else None
    env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    try:
        env["torchao_fp8_sparse_kernel"] = fp8_sparse_kernel_loaded()
    except Exception as e:  # a torchao that does not import with this torch: the variants that need it say so
        env["torchao_fp8_sparse_kernel"] = False
        env["torchao_error"] = _error(e)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


# --------------------------------------------------------------------------------------------------------
# GPU tests
# --------------------------------------------------------------------------------------------------------


def run_tests(paths: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """pytest on ``paths`` in a subprocess (JUnit XML into ``out``): passed, failed and skipped, with reasons and
    seconds. At the time limit pytest gets an interrupt, so it still writes the report of the tests it ran."""
    xml = out / "gpu_tests.xml"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={xml}", *paths]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status: Any = proc.wait(timeout=max(10.0, timeout_s))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest stops after the running test and writes its JUnit report
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        status = "interrupted at the time limit"
    res: dict[str, Any] = {"paths": paths, "exit_status": status, "seconds": round(time.monotonic() - t0, 1),
                           "passed": [], "failed": [], "skipped": []}
    if not xml.is_file():
        res["failed"].append({"test": "(collection)", "message": f"pytest wrote no report (exit status {status})"})
        return res
    for case in ET.parse(xml).getroot().iter("testcase"):
        if not case.get("name"):  # the test an interrupt cut short
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')} ({float(case.get('time') or 0):.1f} s)"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            res["failed"].append({"test": name, "message": (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""})
        elif skip is not None:
            res["skipped"].append({"test": name, "reason": (skip.get("message") or "")[:300]})
        else:
            res["passed"].append(name)
    return res


# --------------------------------------------------------------------------------------------------------
# Models and variants
# --------------------------------------------------------------------------------------------------------


def build_dense(model_id: str, device: str, tiny: bool, seed: int = 0):
    """The published config's transformer with random weights, built on ``device`` in bfloat16 (every parameter
    drawn from N(0, 0.02): diffusers zero-initialises the modulations, and zeros make GEMMs look faster)."""
    import diffusers
    import torch

    from families import published_config
    from families.registry import resolve_model

    adapter, config = published_config(model_id)
    spec = resolve_model(model_id)
    if tiny:
        config = adapter.tiny_config(config)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: Flux.1-dev in float32 would take 48 GB first
    try:
        with torch.device(device):
            model = getattr(diffusers, adapter.transformer_class).from_config(config).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return spec, model.eval().requires_grad_(False)


def step_inputs(spec, model, device: str, tiny: bool) -> dict[str, Any]:
    """One denoising step's transformer inputs at 1024x1024 (64x64 tiny) with the model's CFG batch."""
    import torch

    px = 64 if tiny else 1024
    latent = (px // spec.vae_scale, px // spec.vae_scale)
    text = 16 if tiny else spec.shapes.text_seq_len
    inputs = spec.adapter.transformer_inputs(model, spec.shapes.batch_opt, latent, text, dtype=torch.bfloat16)
    return {k: v.to(device) for k, v in inputs.items()}


def variants_for(model_id: str) -> tuple[str, ...]:
    """The variants measured on ``model_id`` (INT4 on :data:`INT4_MODELS` only)."""
    return tuple(v for v in VARIANTS if v != INT4 or model_id in INT4_MODELS)


def build_int4(dense, *, device: str) -> tuple[Any, dict[str, Any]]:
    """INT4 weight-only (:func:`runtime.torch_int4.quantize_int4_`) on a copy of ``dense``: the linears torchao may
    quantize (the adapter's ``quant_exclude`` kept), codes on stage 1's grid. Converts on the CPU too (PyTorch's CPU
    tinygemm kernel); raises when a converted layer fails its check against the dequantized weight."""
    from runtime.torch_backend import quant_candidates
    from runtime.torch_int4 import quantize_int4_

    model = copy.deepcopy(dense)
    names, kept = quant_candidates(model)
    r = quantize_int4_(model, names, INT4_GROUP)
    if not r.ok:
        raise RuntimeError(f"INT4 layer check: max rel. error {r.layer_max_rel_error:.1e} against the dequantized weights")
    notes = [] if device == "cuda" else ["CUDA kernel aten._weight_int4pack_mm not run (no CUDA): the CPU tinygemm kernel ran the same format"]
    layers = {"kernel": None, "sparse_layers": 0, "quantized_dense_layers": len(r.converted), "refused": {},
              "high_precision": {**kept, **r.left}, "notes": notes, "sparse": []}
    return model, {"layers": layers, "converted": True, "int4": r.to_json()}


def build_variant(name: str, dense, *, device: str, gpu, dry_run: bool):
    """``(module, report)`` of one variant, from a copy of ``dense`` (the dense variant is ``dense`` itself)."""
    from export.surgery import apply_plan, structured_plan
    from obsdiff.baselines import magnitude_prune_model
    from obsdiff.patterns import parse_sparsity
    from runtime import torch_backend as tb

    if name == INT4:
        return build_int4(dense, device=device)

    precision = {"int8": "int8", "fp8": "fp8", "fp8 + 2:4": "fp8"}.get(name, "bf16")
    settings = tb.TorchSettings(precision=tb.PRECISIONS[precision], compile=False)
    model = dense if name == BASELINE else copy.deepcopy(dense)
    sparse = "2:4" in name
    if sparse:
        magnitude_prune_model(model, parse_sparsity("2:4"))
    if name.startswith("structured"):
        model = apply_plan(model, structured_plan(model, 0.3, model_id="gpu-check"))
    return tb.prepare_transformer(model, None, settings, sparse=sparse, device=device, gpu=gpu, apply=not dry_run)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def call(module, inputs: dict[str, Any]):
    import torch

    with torch.inference_mode():
        return module(**inputs, return_dict=False)[0]


def time_once(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call (CUDA events on a GPU, the wall clock on a CPU)."""
    import torch

    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str, rounds: int, deadline: float) -> dict[str, dict[str, Any]]:
    """Each round calls every variant once, the order rotated round by round; stops early at ``deadline``."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        if r and time.monotonic() > deadline:
            break
        for k in names[r % len(names):] + names[: r % len(names)]:
            samples[k].append(time_once(fns[k], device))
    return {k: summary(v) for k, v in samples.items()}


def summary(ms: list[float]) -> dict[str, Any]:
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0], ms[0], ms[0]]
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3),
            "iqr_ms": round(q[2] - q[0], 3), "runs": len(ms)}


_GEMM = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "cusparselt", "wgmma", "s16816", "triton_tem", "_mm_", "matmul", "f8f8")
_NOT_GEMM = ("flash", "fmha", "attention", "softmax", "sdpa")


def kernel_kind(name: str) -> str:
    """``sparse-gemm``, ``gemm`` or ``other`` from a CUDA kernel's name (cuSPARSELt and CUTLASS sparse kernels
    carry ``sparse``/``sp`` tile names; attention kernels are not counted as GEMMs)."""
    n = name.lower()
    if any(s in n for s in _NOT_GEMM):
        return "other"
    if "sparse" in n or "cusparselt" in n or "_sp_" in n:
        return "sparse-gemm"
    return "gemm" if any(s in n for s in _GEMM) else "other"


def gemm_profile(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """One call under torch.profiler: GEMM kernel time, the part in sparse kernels, and the top kernels by time
    (so the classification can be checked by eye)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0)
        if us and getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels.append((evt.key, us / 1e3))
    if not kernels:
        return {"gemm_ms": None, "sparse_gemm_ms": None, "sparse_share": None, "note": "no CUDA kernels recorded"}
    kinds = [(k, ms, kernel_kind(k)) for k, ms in kernels]
    gemm = sum(ms for _, ms, kind in kinds if kind != "other")
    sparse = sum(ms for _, ms, kind in kinds if kind == "sparse-gemm")
    top = sorted(kinds, key=lambda t: -t[1])[:8]
    return {"gemm_ms": round(gemm, 3), "sparse_gemm_ms": round(sparse, 3), "sparse_share": round(sparse / gemm, 3) if gemm else None,
            "kernels_ms": round(sum(ms for _, ms in kernels), 3),
            "top_kernels": [{"name": k[:120], "ms": round(ms, 3), "kind": kind} for k, ms, kind in top]}


def memory_probe(module, inputs, device: str) -> dict[str, Any]:
    """Weight bytes (packed sparse and quantized data included) and the activation peak of one call."""
    import torch

    from runtime.torch_backend import weight_bytes

    out: dict[str, Any] = {"weights_gib": round(weight_bytes(module) / 2**30, 3)}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(module, inputs)
        torch.cuda.synchronize()
        out["activation_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    else:
        call(module, inputs)
        out["activation_peak_gib"] = None
    return out


# --------------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------------


def _error(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def check_model(model_id: str, res: Results, *, device: str, gpu, dry_run: bool, deadline: float, rounds: int,
                compile_mode: str | None, compile_scope: str, compile_estimate_s: float, do_compile: bool) -> None:
    import torch

    from runtime.torch_backend import TorchSettings, compile_transformer, int8_sparse_unavailable, layers_by_kind

    entry: dict[str, Any] = {"variants": {}, "unavailable": {}, "compiled": [], "not_compiled": {}}
    res.data["models"][model_id] = entry
    t0 = time.monotonic()
    spec, dense = build_dense(model_id, device, dry_run)
    inputs = step_inputs(spec, dense, device, dry_run)
    entry.update(model=model_id, parameters=sum(p.numel() for p in dense.parameters()),
                 batch=spec.shapes.batch_opt, resolution=64 if dry_run else 1024,
                 inputs={k: list(v.shape) for k, v in inputs.items()}, build_s=round(time.monotonic() - t0, 1))
    try:
        why = int8_sparse_unavailable()
    except Exception as e:  # torchao missing or broken: every torchao variant will record its own error
        why = f"torchao unusable: {_error(e)}"
    if why:
        entry["unavailable"]["int8 + 2:4"] = why
    res.save()

    modules: dict[str, Any] = {}
    for name in variants_for(model_id):
        v: dict[str, Any] = {}
        entry["variants"][name] = v
        if time.monotonic() > deadline:
            v["skipped"] = "budget spent before this variant was built"
            continue
        t = time.monotonic()
        try:
            module, report = build_variant(name, dense, device=device, gpu=gpu, dry_run=dry_run)
            layers = report["layers"]
            v.update(kernel=layers["kernel"], sparse_layers=layers["sparse_layers"], quantized_layers=layers["quantized_dense_layers"],
                     refused=layers["refused"], notes=layers["notes"], converted=report["converted"],
                     sparse_by_kind=layers_by_kind(layers["sparse"]), build_s=round(time.monotonic() - t, 1))
            if "int4" in report:
                v["int4"] = report["int4"]
            v.update(memory_probe(module, inputs, device))  # also the first (eager) call
            call(module, inputs)
            _sync(device)
            modules[name] = module
        except torch.cuda.OutOfMemoryError:
            v["error"] = "out of GPU memory with the variants built so far resident"
            torch.cuda.empty_cache()
        except Exception as e:  # a kernel or conversion the installed libraries refuse: record and go on
            v["error"] = _error(e)
            log.warning("%s %s: %s", model_id, name, v["error"])
        res.save()

    fns = {k: (lambda m=m: call(m, inputs)) for k, m in modules.items()}
    if fns:
        for k, s in time_interleaved(fns, device, rounds, deadline).items():
            entry["variants"][k]["eager"] = s
        res.save()
    for name in ("dense bf16", "2:4 bf16", "fp8", "fp8 + 2:4"):
        if name in fns and time.monotonic() < deadline:
            entry["variants"][name]["profile_eager"] = gemm_profile(fns[name], device)
    res.save()

    compiled: dict[str, Any] = {}
    estimate = compile_estimate_s
    how = TorchSettings(compile_mode=compile_mode, compile_scope=compile_scope)
    entry["compile"] = {"mode": compile_mode, "scope": compile_scope}
    for name in COMPILE_ORDER:
        if name not in modules:
            continue
        if not do_compile:
            entry["not_compiled"][name] = "dry run" if dry_run else "--no-compile"
            continue
        if deadline - time.monotonic() < estimate * 1.2:
            entry["not_compiled"][name] = f"budget: {max(0, deadline - time.monotonic()):.0f} s left, a compile took ~{estimate:.0f} s"
            continue
        t = time.monotonic()
        try:
            cm = compile_transformer(modules[name], how)  # in place: its eager times are taken
            call(cm, inputs)
            call(cm, inputs)
            _sync(device)
            compiled[name] = cm
            took = time.monotonic() - t
            entry["variants"][name]["compile_s"] = round(took, 1)
            entry["compiled"].append(name)
            estimate = max(took, estimate if not compiled else 0.0)
        except Exception as e:
            entry["variants"][name]["compile_error"] = _error(e)
            entry["not_compiled"][name] = "compile failed"
        res.save()
    if compiled:
        cfns = {k: (lambda m=m: call(m, inputs)) for k, m in compiled.items()}
        for k, s in time_interleaved(cfns, device, rounds, deadline + 30).items():
            entry["variants"][k]["compiled"] = s
        for name in ("2:4 bf16", "fp8 + 2:4"):
            if name in cfns:
                entry["variants"][name]["profile_compiled"] = gemm_profile(cfns[name], device)
    ratios(entry, model_id)
    res.save()
    del modules, compiled, dense
    if device == "cuda":
        torch.cuda.empty_cache()


def ratios(entry: dict[str, Any], model_id: str) -> None:
    """Each variant's median over dense bf16's in the same mode: ``ratio_eager`` (eager / dense eager) and
    ``ratio_compiled`` (compiled / dense compiled), where both were timed."""
    base = entry["variants"].get(BASELINE, {})
    for mode in ("eager", "compiled"):
        if mode not in base:
            continue
        for v in entry["variants"].values():
            if mode in v:
                v[f"ratio_{mode}"] = round(v[mode]["median_ms"] / base[mode]["median_ms"], 3)
    if model_id == "flux.1-dev":
        entry["flux_28_steps_s"] = {f"{name} ({'compiled' if v.get('compiled') else 'eager'})":
                                    round(FLUX_STEPS * (v.get("compiled") or v["eager"])["median_ms"] / 1e3, 2)
                                    for name, v in entry["variants"].items() if v.get("compiled") or v.get("eager")}
        entry["published_diffusers_torchao_s"] = PUBLISHED_FLUX


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------


def _ms(s: dict[str, Any] | None) -> str:
    return f"{s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f}, n={s['runs']})" if s else "-"


def _compile_text(c: dict[str, Any] | None) -> str:
    return f"mode {c.get('mode') or 'default'}, per {'block' if c.get('scope') == 'blocks' else 'model'}" if c else "not reached"


def render_markdown(d: dict[str, Any]) -> str:
    env = d.get("environment", {})
    gpu = env.get("gpu") or {}
    dry = " (DRY RUN on CPU: tiny configs, nothing converted but INT4 on the CPU kernel, nothing compiled)"
    lines = [f"# GPU check{dry if d.get('dry_run') else ''}", "",
             f"GPU: {gpu.get('name', 'none')} (compute {gpu.get('compute_capability', '-')}), CUDA {env.get('cuda')}, "
             f"cuSPARSELt {env.get('cusparselt')}, torchao FP8+2:4 kernel loaded: {env.get('torchao_fp8_sparse_kernel')}. "
             f"Versions: {', '.join(f'{k} {v}' for k, v in (env.get('versions') or {}).items())}. "
             f"Elapsed {d.get('elapsed_s')} s of a {d.get('budget_s')} s budget.", ""]
    t = d.get("tests")
    if t:
        lines += [f"## GPU tests ({t['seconds']} s): {len(t['passed'])} passed, {len(t['failed'])} failed, {len(t['skipped'])} skipped", ""]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in t["failed"]]
        lines += [f"- skipped {s['test']}: {s['reason']}" for s in t["skipped"]]
        lines.append("")
    for model_id, e in d.get("models", {}).items():
        n = e.get("parameters") or 0
        size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
        lines += [f"## {model_id}: {size} parameters, one step at {e.get('resolution')}x{e.get('resolution')}, batch {e.get('batch')}", "",
                  f"Step time in ms, median (min-max, runs), {'wall clock' if d.get('dry_run') else 'CUDA events'}, variants interleaved; "
                  f"x: the median over {BASELINE}'s in the same mode (torch.compile: {_compile_text(e.get('compile'))}).", "",
                  "| variant | eager | x | compiled | x | sparse share of GEMM time | weights GiB | activation peak GiB | 2:4 layers | quantized | left dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in e.get("variants", {}).items():
            if "error" in v or "skipped" in v:
                lines.append(f"| {name} | {v.get('error') or v.get('skipped')} |  |  |  |  |  |  |  |  |  |")
                continue
            prof = v.get("profile_compiled") or v.get("profile_eager") or {}
            share = prof.get("sparse_share")
            lines.append(f"| {name} | {_ms(v.get('eager'))} | {v.get('ratio_eager', '-')} | {_ms(v.get('compiled'))} | {v.get('ratio_compiled', '-')} | "
                         f"{'-' if share is None else f'{share:.0%}'} | {v.get('weights_gib', '-')} | {v.get('activation_peak_gib', '-')} | "
                         f"{v.get('sparse_layers', 0)} ({v.get('kernel') or '-'}) | {v.get('quantized_layers', 0)} | {len(v.get('refused', {}))} |")
        lines.append("")
        if e.get("not_compiled"):
            lines += ["Not compiled: " + "; ".join(f"{k}: {why}" for k, why in e["not_compiled"].items()), ""]
        for name, why in e.get("unavailable", {}).items():
            lines += [f"Not measured ({name}): {why}.", ""]
        int4 = e.get("variants", {}).get(INT4, {}).get("int4")
        if int4:
            req = int4.get("torchao_requantization") or {}
            lines += [f"INT4 weight-only ({INT4}): {int4['int4_layers']} linears, group {int4['group_size']}, codes from {int4['codes_from']}, "
                      f"{int4['kernel']}; each layer against its dequantized weight: max rel. error {int4['layer_check']['max_rel_error']:.1e} "
                      f"(tolerance {int4['layer_check']['tolerance']:.0e}); scales rounded by at most {int4['scale_rounding_max_rel']:.1e}. "
                      f"torchao's own quantizer (Int4WeightOnlyConfig's grid) fed these weights keeps {req.get('codes_kept', 0):.1%} of the codes "
                      f"(weights {req.get('weight_rel_error', 0):.1%} off).", ""]
        refusals = {why for v in e.get("variants", {}).values() for why in v.get("refused", {}).values()}
        if refusals:
            lines += ["2:4 layers left dense, reasons: " + "; ".join(sorted(refusals)[:6]), ""]
        if e.get("flux_28_steps_s"):
            lines += ["28 steps of the Flux.1-dev transformer (this run, s) next to diffusers-torchao's published whole-pipeline "
                      "figures (H100, text encoders and VAE included, s):", "",
                      "| this run | s | | diffusers-torchao | s |", "|---|---|---|---|---|"]
            ours, theirs = list(e["flux_28_steps_s"].items()), list(e["published_diffusers_torchao_s"].items())
            for i in range(max(len(ours), len(theirs))):
                a = ours[i] if i < len(ours) else ("", "")
                b = theirs[i] if i < len(theirs) else ("", "")
                lines.append(f"| {a[0]} | {a[1]} | | {b[0]} | {b[1]} |")
            lines.append("")
    if d.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in d["notes"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


class HardLimit(BaseException):
    """Raised by the alarm at ``--hard-limit-s`` (a BaseException: the per-variant error handlers let it through)."""


def _hard_limit(signum, frame):
    raise HardLimit()


def main(argv: list[str] | None = None) -> int:
    from benchmarks import program
    from common.cli import float_range, int_at_least

    p = program.parser("gpu_check", __doc__)
    p.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and gpu_tests.xml")
    p.add_argument("--wheels", default=None, help="wheel folder for diffusers/torchao when they are not installed (make gpu-wheels)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, nothing converted or compiled: the program's plumbing")
    p.add_argument("--budget-s", type=float_range(10.0), default=390.0,
                   help="seconds the phases plan for (default 390); a compile that runs over is stopped at --hard-limit-s")
    p.add_argument("--hard-limit-s", type=float_range(10.0), default=None,
                   help="the run stops here whatever it is doing, keeping what it wrote (default: budget + 60 s, 7.5 minutes)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated registry ids with published configs (default {','.join(MODELS)})")
    p.add_argument("--tests", default="tests/gpu/test_torch_backend_gpu.py,tests/gpu",
                   help="GPU test paths for pytest, comma-separated, in order (default: the torch backend's, then the rest of tests/gpu)")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    p.add_argument("--tests-budget-s", type=float_range(10.0), default=100.0, help="at most this long for the GPU tests (default 100)")
    p.add_argument("--rounds", type=int_at_least(1), default=None, help="timed rounds per phase (default 10; 2 in a dry run)")
    p.add_argument("--no-compile", action="store_true", help="time eager only")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default PyTorch's; max-autotune compiles for minutes)")
    p.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                   help="blocks: regional compilation, one compile per block kind (default); model: one graph")
    p.add_argument("--compile-estimate-s", type=float_range(1.0), default=60.0, help="assumed time of the first compile, for the budget (default 60)")

    def body(args) -> int:
        t0 = time.monotonic()
        logging.getLogger("diffusers").setLevel(logging.ERROR)  # per-call deprecation warnings would flood the timed loops
        from common.errors import UserError
        from common.io import check_output, make_dirs

        out = check_output(Path(args.out), "parent")
        make_dirs(out)
        installed = install_missing(Path(args.wheels) if args.wheels else None)
        import torch

        from families import published_config
        from families.registry import resolve_model
        from runtime.manifest import current_gpu

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        for m in models:
            published_config(m)
            resolve_model(m)
        if not args.dry_run and not torch.cuda.is_available():
            raise UserError("no CUDA GPU visible (torch.cuda.is_available() is False): run on a GPU host, or add --dry-run (DRY_RUN=1)")
        device = "cpu" if args.dry_run else "cuda"
        # six variants recompile each block kind six times or more: above dynamo's default limit of 8 per code
        # object, later variants would silently run eager
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        gpu = None if args.dry_run else current_gpu()
        res = Results(out, {"_t0": t0, "dry_run": args.dry_run, "budget_s": args.budget_s, "wheels": installed,
                            "environment": environment(device), "tests": None, "models": {}, "notes": []})
        res.save()
        deadline = t0 + args.budget_s
        tests = [] if args.no_tests else [s.strip() for s in args.tests.split(",") if s.strip()]
        if tests:
            res.data["tests"] = run_tests(tests, out, min(args.tests_budget_s, deadline - time.monotonic()))
            res.save()
        rounds = args.rounds or (2 if args.dry_run else 10)
        hard = args.hard_limit_s or args.budget_s + 60
        signal.signal(signal.SIGALRM, _hard_limit)
        signal.alarm(max(1, int(hard - (time.monotonic() - t0))))
        try:
            for i, m in enumerate(models):
                share = (deadline - time.monotonic()) / (len(models) - i)
                try:
                    check_model(m, res, device=device, gpu=gpu, dry_run=args.dry_run, deadline=time.monotonic() + share, rounds=rounds,
                                compile_mode=args.compile_mode, compile_scope=args.compile_scope, compile_estimate_s=args.compile_estimate_s,
                                do_compile=not (args.no_compile or args.dry_run))
                except torch.cuda.OutOfMemoryError:
                    res.data["notes"].append(f"{m}: out of GPU memory building the dense model")
                    res.save()
        except HardLimit:
            res.data["notes"].append(f"stopped at the hard limit ({hard:.0f} s): what follows the last measurement above did not run")
        finally:
            signal.alarm(0)
        if args.dry_run:
            res.data["notes"].append("dry run: CPU, tiny configs at 64x64, layers chosen but not converted (INT4 converted on PyTorch's CPU "
                                     "tinygemm kernel), nothing compiled")
        res.save()
        log.info("GPU check written to %s (%.0f s)", out, time.monotonic() - t0)
        print(out / "gpu_check.md")
        return 0

    return program.run(p, argv, body)


if __name__ == "__main__":
    raise SystemExit(main())
