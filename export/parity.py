"""ONNX Runtime parity: a CPU session, the relative error, the comparison of an ONNX model with its torch
reference at several batches (:func:`check_parity`, :class:`Parity`), the torch side computed before the
export so that torch and ONNX Runtime never hold the weights at once (:class:`ParityReference`), float32
arithmetic over half weights (:func:`fp32_compute`), the tolerances per precision, and the check's
activation memory: capped by the weights (:func:`plan_parity_shapes`: a case over the cap runs at a smaller
latent shape of the same graph), estimated from batch, heads and tokens, logged, and refused with one line
naming the ``--parity-batches`` that fits, before the export starts (:func:`plan_parity_memory`)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.memory import log_memory, release_to_os
from export.onnx_files import human_bytes, io_spec

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
# float16 ONNX vs the float32 torch model, relative to the output's scale: fp16's unit roundoff is
# 2^-11 ~ 4.9e-4 per rounding of weights and activations; it compounds over blocks. 1e-2 is ~20 roundoffs,
# i.e. loose enough for a 24-block SD3 (tiny-sd3 measures ~5e-4) yet tight enough to catch a real error
# (a wrong cast, an overflow to inf, or a dropped layer-norm each give errors >= 5e-2).
FP16_TOLERANCE = 1e-2


def parity_tolerance(precision: str) -> float:
    """The ONNX-vs-torch tolerance of an export precision (``fp32`` or ``fp16``)."""
    return FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE


def ort_session(path: str | os.PathLike, *, threads: int | None = None, optimize: bool = True, lean: bool = False):
    """A CPU ``InferenceSession`` with the project's session options (:mod:`common.ort_options`: no idle spinning,
    exact integer GEMMs on CPUs without VNNI).

    optimize: ONNX Runtime's graph optimisations (default on; off runs the graph exactly as exported).
    lean: no memory arena and no memory-pattern preallocation (a check runs a few calls, each of a different
    shape: nothing is gained by keeping its largest activations allocated between them), and the priority-based
    execution order. For a float16 graph ONNX Runtime's CPU kernels insert a float32 Cast of every weight; those
    Casts depend on nothing, and the default order runs many of them early, so the float32 copies of later
    blocks' weights wait alive for their block: 2.16 GiB at once in the SD3-medium-sized transformer (24 blocks),
    0.05 GiB in the priority-based order, which runs each Cast just before its consumer (measured from ORT's
    profile of the executed order; the same kernels run, only their order differs).
    """
    import onnxruntime as ort

    from common.ort_options import session_options

    so = session_options(threads=threads, optimize=optimize, lean=lean)
    if lean:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


# ONNX Runtime's CPU kernels materialise attention's scores, batch x heads x tokens^2 in float32 (also for a
# float16 graph: it runs them through float32 Casts), and hold about 2.2 such tensors at the peak: measured on
# an SD3 transformer with 8 heads at 4,429 tokens (SD3-medium's at 1024x1024), 1.25 GiB above the session at
# batch 1 and 3.78 GiB at batch 3, against 0.59 and 1.76 GiB of scores; its arena and memory-pattern planning
# change that by 3%. At real size it is more: the SD3-medium-sized transformer (24 heads, 3.9 GiB of float16
# ONNX) at 3,582 tokens took 3.4 GiB above its weights at batch 1, about 3 score tensors of 1.15 GiB. The estimate
# takes 3 (the check's cap, :func:`parity_memory_cap`, leaves the rest of the export's bound as margin). The
# torch reference does not materialise them: its CPU attention is tiled.
ORT_SCORE_TENSORS = 3.0
_BUDGET_ENV = "SDD_PARITY_BUDGET_BYTES"  # tests: the memory the check may use, instead of what is available


def attention_tokens(module: nn.Module, adapter, latent_hw: tuple[int, int], seq_len: int | None) -> int:
    """Tokens one attention of ``module`` sees at a latent shape: a transformer's (patch) image tokens plus
    its text tokens (joint attention), or a VAE's latent pixels (its mid-block attention)."""
    config = dict(getattr(module, "config", {}) or {})
    h, w = latent_hw
    if "patch_size" in config or "joint_attention_dim" in config:
        p = adapter.latent_patch(config)
        return (h // p) * (w // p) + int(seq_len or 0)
    return h * w


def attention_heads(module: nn.Module) -> int:
    """The most heads any attention of ``module`` has (0: no attention)."""
    return max((m.heads for m in module.modules() if isinstance(getattr(m, "heads", None), int)), default=0)


def ort_activation_bytes(batch: int, heads: int, tokens: int) -> int:
    """ONNX Runtime's activation memory for one attention model call (see :data:`ORT_SCORE_TENSORS`)."""
    return int(ORT_SCORE_TENSORS * batch * heads * tokens * tokens * 4)


def available_bytes() -> int:
    """Memory a new allocation can have now (``MemAvailable``; ``SDD_PARITY_BUDGET_BYTES`` overrides)."""
    from common.memory import proc_bytes

    if os.environ.get(_BUDGET_ENV):
        return int(os.environ[_BUDGET_ENV])
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else 1 << 62


def parity_memory_cap(weight_bytes: int) -> int:
    """The activation memory the parity check of a component takes at most by default: half its ONNX weights
    + 1 GiB. The export's bound is 1.5x the weights + 2 GiB: while the check runs, ONNX Runtime holds the
    weights (1x) and the process about 1 GiB (interpreter, torch, onnx); the rest is the check's."""
    return int(0.5 * weight_bytes) + (1 << 30)


def _shrink(hw: tuple[int, int], step: int, fits: Callable[[tuple[int, int]], bool]) -> tuple[int, int] | None:
    """The largest latent shape below ``hw``, of about its aspect ratio and in multiples of ``step``, that
    ``fits`` (None when not even ``step x step`` does)."""
    h, w = hw
    for n in range(h // step, 0, -1):
        cand = (n * step, max(1, round(w * n / h)) * step)
        if (cand[0] < h or cand[1] < w) and cand[0] <= h and cand[1] <= w and fits(cand):
            return cand
    return None


def plan_parity_shapes(name: str, cases: dict[str, tuple[int, tuple[int, int]]], heads: int, tokens_at: Callable[[tuple[int, int]], int],
                       *, weight_bytes: int, step: int, memory: int | None = None, held_bytes: int = 0) -> tuple[dict[str, tuple[int, tuple[int, int]]], dict[str, Any]]:
    """Where the ONNX Runtime parity check of a component whose shapes follow the resolution runs: each case
    (``label -> (batch, latent (h, w))``) at its served shape when its estimated activations
    (:func:`ort_activation_bytes`) fit the check's cap, else at the largest smaller latent shape (multiples of
    ``step``, about the same aspect ratio) that does. The estimate is logged before the export starts; a check
    that does not fit in the memory available now stops with one line naming the option that does.

    The cap: ``memory`` bytes if given (``--parity-memory``), else :func:`parity_memory_cap` of the component's
    ONNX ``weight_bytes``. Why a smaller shape still proves the export: the exported graph is one graph whose
    spatial axes are symbolic over the served range and the checked shape; a check runs every node and every
    weight of it, so a wrong cast, an overflow, a dropped or mis-wired layer or a wrong weight still shows.
    What only the served shape would show (its position-embedding crop) is checked at the served shape
    whenever it fits. Returns the cases to run (relabelled ``batch@hxw`` where the shape changed) and the
    report entry (``{}`` when every case runs as served).
    """
    cap = int(memory) if memory is not None else parity_memory_cap(weight_bytes)
    est = lambda b, hw: ort_activation_bytes(b, heads, tokens_at(hw))  # noqa: E731
    planned: dict[str, tuple[int, tuple[int, int]]] = {}
    reduced: dict[str, Any] = {}
    for label, (b, hw) in cases.items():
        if est(b, hw) <= cap:
            planned[label] = (b, tuple(hw))
            continue
        small = _shrink(tuple(hw), step, lambda c: est(b, c) <= cap)
        if small is None:
            raise UserError(f"the ONNX Runtime parity check of {name} at batch {b} needs about {human_bytes(est(b, (step, step)))} of "
                            f"activations even at a {step}x{step} latent, over its {human_bytes(cap)} cap: pass a larger --parity-memory, "
                            "fewer --parity-batches, or --parity-batches '' to skip the check")
        new = f"{b}@{small[0]}x{small[1]}"
        planned[new] = (b, small)
        reduced[new] = {"served_latent": list(hw), "checked_latent": list(small), "batch": b,
                        "served_estimate_bytes": est(b, hw), "checked_estimate_bytes": est(b, small)}
    if reduced:
        log.info("%s: parity at the served shape would need more than its %s cap (--parity-memory; default half the ONNX "
                 "weights + 1 GiB, which keeps the export within 1.5x its weights + 2 GiB): checked at %s instead", name, human_bytes(cap),
                 ", ".join(f"latent {r['checked_latent'][0]}x{r['checked_latent'][1]} at batch {r['batch']} ({human_bytes(est(r['batch'], tuple(r['checked_latent'])))}; "
                           f"served {r['served_latent'][0]}x{r['served_latent'][1]}: {human_bytes(est(r['batch'], tuple(r['served_latent'])))})"
                           for r in reduced.values()))
    plan_parity_memory(name, {k: (b, tokens_at(hw)) for k, (b, hw) in planned.items()}, heads, held_bytes=held_bytes)
    return planned, ({"cap_bytes": cap, "cases": reduced} if reduced else {})


def plan_parity_memory(name: str, cases: dict[str, tuple[int, int]], heads: int, *, held_bytes: int = 0) -> dict[str, int]:
    """Estimate the ONNX Runtime parity check's activation memory per case (``label -> (batch, tokens)``),
    log it, and stop with one line before the export when the largest case would not fit.

    The check runs after the torch module is freed and ONNX Runtime holds the exported weights instead (about
    the same bytes), so what it adds is its activations; they must fit in the memory available now, less
    ``held_bytes`` that the process keeps besides and 1 GiB of margin. The message names the
    ``--parity-batches`` that fits: a check at batch 1 still runs every layer of the exported graph on the
    served shape, so it still catches a wrong cast, an overflow, a dropped or mis-wired layer; the batch axis
    is then checked for a batch other than the exported example's (2). Returns the estimate per case (bytes).
    """
    est = {label: ort_activation_bytes(b, heads, t) for label, (b, t) in cases.items()}
    if not est:
        return est
    gib = lambda n: n / 2**30  # noqa: E731
    budget = available_bytes() - held_bytes - (1 << 30)
    log.info("%s: ONNX Runtime parity check, estimated activations %s (%d heads); %.1f GiB available for them", name,
             ", ".join(f"{gib(v):.2f} GiB at {k} ({cases[k][1]:,} tokens)" for k, v in est.items()), heads, gib(budget))
    worst = max(est, key=est.get)
    if est[worst] <= budget:
        return est
    batch, tokens = cases[worst]
    batches = sorted({b for b, _ in cases.values()})
    fits = [b for b in batches if ort_activation_bytes(b, heads, tokens) <= budget]
    if fits and batch in batches and "@" not in worst:
        hint = f"pass --parity-batches {','.join(map(str, fits))} (about {gib(ort_activation_bytes(max(fits), heads, tokens)):.1f} GiB)"
    elif "@" in worst:
        hint = "serve fewer or smaller resolutions (--resolution), or pass --parity-batches '' to skip the check"
    else:
        hint = "pass --parity-batches '' to skip the check (the export is then not compared with torch), or export on a machine with more memory"
    raise UserError(f"the ONNX Runtime parity check of {name} at batch {batch} and {tokens:,} tokens needs about {gib(est[worst]):.1f} GiB "
                    f"of activations, and {gib(max(budget, 0)):.1f} GiB are available: {hint}")


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (error relative to the output's scale, float64)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(a - ref).max() / scale)


@dataclass
class Parity:
    """Result of comparing an ONNX model with its torch reference on random inputs."""

    batch_errors: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> output -> rel. error
    tolerance: float = 1e-4
    reference: str = "torch fp32"

    @property
    def max_error(self) -> float:
        return max((e for d in self.batch_errors.values() for e in d.values()), default=0.0)

    @property
    def ok(self) -> bool:
        return all(np.isfinite(e) and e <= self.tolerance for d in self.batch_errors.values() for e in d.values())

    def summary(self) -> str:
        """One line: the worst case, its error and the tolerance (for a failed check's error line)."""
        cases = [(e if np.isfinite(e) else float("inf"), b, out) for b, d in self.batch_errors.items() for out, e in d.items()]
        if not cases:
            return f"no case compared with {self.reference}"
        worst, b, out = max(cases)
        bad = sum(not (e <= self.tolerance) for e, _, _ in cases)
        return (f"max |ONNX Runtime - {self.reference}| / max |ref| of {out} is {worst:.2e} at batch {b} (tolerance {self.tolerance:.0e}); "
                f"{bad} of {len(cases)} outputs over it")

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "tolerance": self.tolerance,
            "max_rel_error": self.max_error,
            "ok": self.ok,
            "per_batch": {str(b): d for b, d in self.batch_errors.items()},
        }


def check_parity(
    path: str | os.PathLike,
    reference: Callable[[dict[str, torch.Tensor]], Sequence[torch.Tensor]],
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    output_names: Sequence[str],
    *,
    batches: Sequence[int] = (1, 3),
    tolerance: float = 1e-4,
    reference_name: str = "torch fp32",
    session=None,
) -> Parity:
    """Run ``path`` in ONNX Runtime (CPU) and ``reference`` on the same inputs at each batch size.

    make_inputs(batch) gives the ONNX inputs (numpy-convertible tensors, in the ONNX dtypes);
    reference(inputs) returns the outputs in ``output_names`` order. Error: :func:`rel_error`.
    """
    sess = session or ort_session(path)
    result = Parity(tolerance=tolerance, reference=reference_name)
    for b in batches:
        inputs = make_inputs(b)
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        got = sess.run(list(output_names), feeds)
        with torch.no_grad():
            ref = reference(inputs)
        result.batch_errors[b] = {name: rel_error(g, r.detach().float().cpu().numpy()) for name, g, r in zip(output_names, got, ref)}
        for name, g in zip(output_names, got):
            assert g.shape[0] == b, f"{name}: ONNX returned batch {g.shape[0]} for input batch {b}"
    return result


@contextlib.contextmanager
def fp32_compute(module: nn.Module) -> Iterator[nn.Module]:
    """Run a float16 (or bfloat16) ``module`` with float32 arithmetic, one layer's weights at a time.

    Every submodule that owns parameters runs on float32 copies of its half weights and buffers (and of its
    submodules'), made just before it runs and dropped right after, and floating inputs are upcast: the float32
    reference of a half-precision export without a float32 copy of the whole model. The half tensors stay where
    they are: casting each module there and back (``.to``) reallocated every weight twice per call, and at
    SD3-medium size that churn left about 1 GiB of freed heap resident and raised the reference's peak by 0.7 GiB
    (measured at batch 1 and 3,249 tokens). A float32 module runs unchanged.
    """
    low = {p.dtype for p in module.parameters()} & {torch.float16, torch.bfloat16}
    if not low:
        yield module
        return
    swapped: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # module -> (tensor, its half data)

    def before(m, args, kwargs):
        held = swapped.setdefault(m, [])
        for t in (*m.parameters(), *m.buffers()):
            if t.dtype in (torch.float16, torch.bfloat16):  # a parent's call may have swapped it already
                held.append((t, t.data))
                t.data = t.data.float()
        up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def after(m, _args, _out):
        for t, half in swapped.pop(m, ()):
            t.data = half

    handles = []
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after))
    try:
        yield module
    finally:
        for h in handles:
            h.remove()
        for m in list(swapped):  # a forward that raised left its copies in place
            after(m, None, None)


@dataclass
class ParityReference:
    """Torch outputs at each parity batch, computed before the export so that the torch module can be freed
    before ONNX Runtime loads the exported model (the two never share memory); :meth:`check` runs ORT."""

    path: Path
    output_names: list[str]
    feeds: dict[str, dict[str, np.ndarray]]  # by case label: the batch ("3"), or batch@latent shape ("1@4x8")
    outputs: dict[str, list[np.ndarray]]
    tolerance: float
    reference: str

    def check(self, name: str = "") -> Parity:
        # ONNX Runtime's CPU kernels are float32: for a half-precision model it inserts Casts, and its constant
        # folding would turn them into a float32 copy of every weight (measured: 8.3 GiB of session memory for
        # a 3.9 GiB float16 SD3-medium transformer, 0.04 GiB without). The graph is checked as exported.
        half = any(spec["dtype"] in ("float16", "bfloat16") for spec in io_spec(self.path)[0].values())
        sess = ort_session(self.path, optimize=not half, lean=True)
        result = Parity(tolerance=self.tolerance, reference=self.reference)
        for case, feeds in self.feeds.items():
            got = sess.run(self.output_names, feeds)
            release_to_os()  # the case's activations go back before the next (larger) one
            result.batch_errors[case] = {n: rel_error(g, r) for n, g, r in zip(self.output_names, got, self.outputs[case])}
            b = int(case.split("@")[0])
            for n, g in zip(self.output_names, got):
                assert g.shape[0] == b, f"{n}: ONNX returned batch {g.shape[0]} for input batch {b}"
        del sess
        log.info("%s: ORT vs %s max rel. error %.2e (tolerance %.0e, batches %s)", name or self.path.name, self.reference,
                 result.max_error, result.tolerance, list(self.feeds))
        log_memory(f"{self.path.name}: parity checked")
        return result
