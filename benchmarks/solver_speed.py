"""Solver speed on SD3-medium layer shapes, side by side with a reference SparseGPT ``fasterprune``.

Shapes are ``W (out, in)`` of SD3-medium's transformer blocks (hidden 1536, FFN 6144):
``1536x1536`` (q/k/v, attention outputs), ``6144x1536`` (``ff.net.0.proj``), ``1536x6144`` (``ff.net.2``).
``H`` is the exact second moment of real-like correlated inputs (low-rank shared structure with a decaying
spectrum, per-channel noise, a non-zero mean and a few outlier channels), built in closed form so a 6144-wide
Hessian costs no 6144-wide data matrix. ``W`` is Gaussian, std 0.02.

The reference is SparseGPT's ``fasterprune`` (Frantar & Alistarh 2023, IST-DASLab/sparsegpt), written out below
from the published algorithm (:func:`sparsegpt_fasterprune`): damping ``percdamp * mean(diag H)``, dead
inputs, Cholesky -> ``cholesky_inverse`` -> upper Cholesky, blocks of 128 columns, N:M masks by
``w^2 / d^2`` per group of M columns, lazy batch updates. It is timed on the same ``(W, H)`` as ours.

Whole-model 2:4 section (always): per shape, interleaved over ``--repeats`` rounds after one warm-up, both
solvers' whole solve (ours: ``obs_prune``), their factorisation alone (ours: ``inverse_cholesky_upper``) and
their column loop alone given that factor (ours: ``obs_prune(..., hinv_upper=U)``). The whole SD3-medium 2:4
solve is then estimated from the layer counts (:data:`SD3_MEDIUM_LAYERS`) as the pipeline runs it: a layer
with its own Hessian is one whole solve; q/k/v (and add_q/k/v) share one factorisation and each runs the
loop; the reference is counted the same way, and also as SparseGPT runs (every layer a whole solve).
Reported: the time ratio ours / reference per shape and for the whole model (the median of the per-round
ratios), and the reconstruction-error ratio ``tr(dW H dW^T)`` ours / reference.

Pattern sweep (``--patterns``, off by default): per shape and pattern, ``obs_prune`` (2:4, 4:8, unstructured)
or ``obs_prune_groups`` (structured: heads of 64 on the attention-output shape, neurons on the FFN-output
shape), magnitude, the reference (N:M and unstructured), and ModelOpt's ``create_sgpt_mask`` (N:M only; it
returns a mask, so its weights are the masked originals) where ModelOpt imports.

    python -m benchmarks.solver_speed [--threads 2] [--repeats 3] [--device cuda]
        [--patterns 2:4,4:8,unstructured:0.5,structured:0.3] [--out artifacts/bench/solver_speed.json]
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from benchmarks import program
from common.paths import REPO_ROOT
from obsdiff.baselines import magnitude_prune
from obsdiff.patterns import parse_sparsity
from obsdiff.solvers import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP, inverse_cholesky_upper, obs_prune, obs_prune_groups

log = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "artifacts" / "bench" / "solver_speed.json"
SHAPES = [(1536, 1536), (6144, 1536), (1536, 6144)]
PATTERNS = ["2:4", "4:8", "unstructured:0.5", "structured:0.3"]
HEAD_DIM = 64
TARGET_RATIO = 0.5  # the target for the whole 2:4 solve, ours / reference
ERROR_RATIO_LIMIT = 1.001

# SD3-medium's 2:4 solve (diffusers SD3Transformer2DModel, 24 JointTransformerBlocks, the last one
# context_pre_only: no attn.to_add_out, no ff_context). Per shape W (out, in): the layers solved, and of
# them those whose input is shared (attn.to_q/k/v one Hessian, attn.add_q/k/v_proj another: one
# factorisation per Hessian, passed to obs_prune as hinv_upper) with the number of shared Hessians.
#   joint block: 1536x1536: to_q, to_k, to_v, add_q_proj, add_k_proj, add_v_proj (6 layers, 2 Hessians),
#                  to_out.0, to_add_out (2, own Hessians); 6144x1536: ff.net.0.proj, ff_context.net.0.proj;
#                1536x6144: ff.net.2, ff_context.net.2
#   last block:  1536x1536: the 6 projections (2 Hessians) and to_out.0; 6144x1536: 1; 1536x6144: 1
SD3_MEDIUM_BLOCKS = 24
SD3_MEDIUM_LAYERS: dict[tuple[int, int], dict[str, int]] = {
    (1536, 1536): {"layers": 23 * 8 + 7, "shared_layers": 24 * 6, "shared_hessians": 24 * 2},
    (6144, 1536): {"layers": 23 * 2 + 1, "shared_layers": 0, "shared_hessians": 0},
    (1536, 6144): {"layers": 23 * 2 + 1, "shared_layers": 0, "shared_hessians": 0},
}


def correlated_hessian(cols: int, *, rank: int = 256, seed: int = 0, device="cpu") -> torch.Tensor:
    """``E[x x^T]`` for ``x = B^T z + n + mu`` with ``z ~ N(0, diag(s))``, s decaying from 1 to 1e-2,
    ``n ~ N(0, 0.05^2 I)``, 4 outlier channels scaled by 8: shape ``(cols, cols)``, float32."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(rank, cols, generator=g) / rank**0.5  # (rank, cols)
    s = torch.logspace(0, -2, rank)
    mu = 0.1 * torch.randn(cols, generator=g)
    H = (B.T * s) @ B + 0.05**2 * torch.eye(cols) + torch.outer(mu, mu)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[:4]] = 8.0
    H = H * scale.unsqueeze(0) * scale.unsqueeze(1)
    return H.to(device)


# -- reference: SparseGPT's fasterprune -----------------------------------------------------------------------
# Written from the algorithm of IST-DASLab/sparsegpt (sparsegpt.py, SparseGPT.fasterprune) for timing and
# accuracy comparison only; W is (rows, cols) as there, H is modified in place as there (pass a copy).
def sparsegpt_hinv(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """REFERENCE (SparseGPT): dead inputs, damping, ``cholesky -> cholesky_inverse -> cholesky(upper)``.
    Returns ``(Hinv, dead)``: the upper Cholesky factor of the damped ``H^-1`` and the dead-input mask."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    return H, dead


def sparsegpt_prune(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, *, sparsity: float = 0.0, prunen: int = 0, prunem: int = 0, blocksize: int = 128) -> torch.Tensor:
    """REFERENCE (SparseGPT): the blocked column loop given ``Hinv`` (``prunen`` of every ``prunem`` weights
    pruned per row when ``prunen > 0``, else the ``sparsity`` share per block). Returns the pruned ``W``."""
    W = W.clone().float()
    rows, columns = W.shape
    W[:, dead] = 0
    Losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def sparsegpt_fasterprune(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.0, prunen: int = 0, prunem: int = 0, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """REFERENCE: SparseGPT's ``fasterprune`` on ``W (rows, cols)`` with ``H (cols, cols)`` (modified in place)."""
    Hinv, dead = sparsegpt_hinv(H, percdamp)
    return sparsegpt_prune(W, Hinv, dead, sparsity=sparsity, prunen=prunen, prunem=prunem, blocksize=blocksize)


# -- measurement ----------------------------------------------------------------------------------------------
def recon_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``, accumulated in float64."""
    D = (W.float() - W_new.float()).double()
    return float(((D @ H.double()) * D).sum())


def rel_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``."""
    return recon_error(W, W_new, H) / recon_error(W, torch.zeros_like(W), H)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[..., Any], device: torch.device, *args: Any) -> tuple[float, Any]:
    """Seconds of one call ``fn(*args)`` (arguments prepared beforehand, untimed) and its result."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - t0, out


def _stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def load_modelopt(paths: str | None) -> tuple[Callable | None, str]:
    """``create_sgpt_mask`` and a note: the version, or why it is unavailable."""
    for p in (paths or "").split(os.pathsep):
        if p and os.path.isdir(p) and p not in sys.path:
            sys.path.append(p)
    try:
        import modelopt
        from modelopt.torch.sparsity.weight_sparsity.sparsegpt import create_sgpt_mask
    except Exception as e:  # any import failure is a result to report, not a crash
        return None, f"nvidia-modelopt unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return create_sgpt_mask, f"nvidia-modelopt {modelopt.__version__}"


def _layer(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    H = correlated_hessian(cols, device=device)
    W = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * 0.02).to(device)
    return W, H


def whole_model_2of4(shapes: list[tuple[int, int]], counts: dict[tuple[int, int], dict[str, int]], *, repeats: int, percdamp: float, device: torch.device) -> dict[str, Any]:
    """The 2:4 comparison: per shape and round, both solvers' whole solve, factorisation and column loop,
    interleaved (the order of the two solvers alternates between rounds); then the whole-model estimate."""
    sp = parse_sparsity("2:4")
    layers = {shape: _layer(*shape, device) for shape in shapes}
    ours = {
        "full": lambda W, H: obs_prune(W, H, sp, percdamp=percdamp)[0],
        "factor": lambda W, H: inverse_cholesky_upper(H, percdamp)[0],
        "loop": lambda W, H, U: obs_prune(W, H, sp, percdamp=percdamp, hinv_upper=U)[0],
    }
    ref = {
        "full": lambda W, H: sparsegpt_fasterprune(W, H, prunen=2, prunem=4, percdamp=percdamp),
        "factor": lambda W, H: sparsegpt_hinv(H, percdamp),
        "loop": lambda W, H, Hinv_dead: sparsegpt_prune(W, *Hinv_dead, prunen=2, prunem=4),
    }
    solvers = {"ours": ours, "reference": ref}
    factors = {(name, shape): fns["factor"](W, H.clone()) for name, fns in solvers.items() for shape, (W, H) in layers.items()}
    times: dict[tuple, list[float]] = {}
    outs: dict[tuple, torch.Tensor] = {}
    for rnd in range(repeats + 1):  # round 0 is the warm-up
        for shape, (W, H) in layers.items():
            order = list(solvers) if rnd % 2 else list(solvers)[::-1]
            for part in ("full", "factor", "loop"):
                for name in order:
                    fn = solvers[name][part]
                    args = (W, H.clone()) if part != "loop" else (W, H, factors[(name, shape)])  # the copy is untimed
                    dt, out = _time(fn, device, *args)
                    if rnd:
                        times.setdefault((name, shape, part), []).append(dt)
                    if part == "full":
                        outs[(name, shape)] = out
                log.info("round %d %dx%d %s: ours %.3f s, reference %.3f s", rnd, *shape, part,
                         times.get(("ours", shape, part), [float("nan")])[-1], times.get(("reference", shape, part), [float("nan")])[-1])

    per_shape = []
    errors: dict[tuple[int, int], dict[str, float]] = {}
    for shape, (W, H) in layers.items():
        err = errors[shape] = {name: recon_error(W, outs[(name, shape)], H) for name in solvers}
        entry: dict[str, Any] = {"shape": list(shape), "count": dict(counts.get(shape, {}))}
        for name in solvers:
            for part in ("full", "factor", "loop"):
                entry[f"{name}_{part}"] = _stats(times[(name, shape, part)])
            entry[f"{name}_rel_error"] = err[name] / recon_error(W, torch.zeros_like(W), H)
        entry["time_ratio"] = statistics.median(o / r for o, r in zip(times[("ours", shape, "full")], times[("reference", shape, "full")]))
        entry["error_ratio"] = err["ours"] / err["reference"]
        entry["mask_agreement"] = float(((outs[("ours", shape)] != 0) == (outs[("reference", shape)] != 0)).float().mean())
        per_shape.append(entry)

    def model_seconds(name: str, r: int, share: bool = True) -> float:
        """The whole solve in round r: a layer with its own Hessian is one whole solve; a shared Hessian is
        factorised once and each of its layers is a loop given the factor (``share=False``: every layer is
        a whole solve, as SparseGPT runs)."""
        total = 0.0
        for s, c in counts.items():
            t = {part: times[(name, s, part)][r] for part in ("full", "factor", "loop")}
            if share:
                total += (c["layers"] - c["shared_layers"]) * t["full"] + c["shared_hessians"] * t["factor"] + c["shared_layers"] * t["loop"]
            else:
                total += c["layers"] * t["full"]
        return total

    whole: dict[str, Any] = {}
    if all(s in layers for s in counts):
        ours_s = [model_seconds("ours", r) for r in range(repeats)]
        ref_s = [model_seconds("reference", r) for r in range(repeats)]
        ref_layer_s = [model_seconds("reference", r, share=False) for r in range(repeats)]
        err_sum = {name: sum(c["layers"] * errors[s][name] for s, c in counts.items()) for name in solvers}  # every layer's error
        whole = {
            "ours_s": _stats(ours_s),
            "reference_s": _stats(ref_s),
            "reference_unshared_s": _stats(ref_layer_s),
            "time_ratio": statistics.median(o / r for o, r in zip(ours_s, ref_s)),
            "time_ratio_vs_unshared": statistics.median(o / r for o, r in zip(ours_s, ref_layer_s)),
            "error_ratio": err_sum["ours"] / err_sum["reference"],
            "max_shape_error_ratio": max(e["error_ratio"] for e in per_shape),
            "target_time_ratio": TARGET_RATIO,
            "error_ratio_limit": ERROR_RATIO_LIMIT,
        }
        whole["meets_target"] = whole["time_ratio"] <= TARGET_RATIO and whole["max_shape_error_ratio"] <= ERROR_RATIO_LIMIT
        log.info("whole SD3-medium 2:4 solve: ours %.1f s, reference %.1f s, ratio %.3f, error ratio %.5f",
                 whole["ours_s"]["median_s"], whole["reference_s"]["median_s"], whole["time_ratio"], whole["error_ratio"])
    return {"shapes": per_shape, "whole_model": whole}


def pattern_sweep(shapes: list[tuple[int, int]], patterns: list[str], *, repeats: int, percdamp: float, device: torch.device, sgpt: Callable | None) -> list[dict[str, Any]]:
    """Every solver on every shape and pattern, interleaved over ``repeats`` timed runs after one warm-up."""
    results = []
    for rows, cols in shapes:
        W, H = _layer(rows, cols, device)
        for pattern in patterns:
            sp = parse_sparsity(pattern)
            variants: dict[str, Callable[[], torch.Tensor]] = {}
            if sp.kind == "structured":
                if rows == cols:  # attention output: heads of HEAD_DIM columns
                    gsize, what = HEAD_DIM, "heads"
                elif cols > rows:  # FFN output: neurons
                    gsize, what = 1, "neurons"
                else:
                    continue  # FFN input rows are cut by stage 2 from the output layer's decision
                n_remove = int(round(sp.ratio * cols // gsize))
                variants["obs-diff"] = lambda W=W, H=H, g=gsize, n=n_remove: obs_prune_groups([W], [H], g, n, percdamp=percdamp)[0][0]
            else:
                what = "weights"
                variants["obs-diff"] = lambda W=W, H=H, sp=sp: obs_prune(W, H, sp, percdamp=percdamp)[0]
                variants["magnitude"] = lambda W=W, sp=sp: magnitude_prune(W, None, sp)[0]
                if sp.kind == "nm":
                    variants["sparsegpt-reference"] = lambda W=W, H=H, sp=sp: sparsegpt_fasterprune(W, H.clone(), prunen=sp.m - sp.n, prunem=sp.m, percdamp=percdamp)
                else:
                    variants["sparsegpt-reference"] = lambda W=W, H=H, sp=sp: sparsegpt_fasterprune(W, H.clone(), sparsity=sp.ratio, percdamp=percdamp)
                if sgpt is not None and sp.kind == "nm":
                    cfg = {"pattern": f"{sp.n}:{sp.m} sparsity", "hessian_damp": percdamp, "col_block_size": 128, "row_block_size": -1}
                    variants["modelopt-sparsegpt"] = lambda W=W, H=H, cfg=cfg: W * sgpt(W, H.clone(), cfg)
            times: dict[str, list[float]] = {k: [] for k in variants}
            outs: dict[str, torch.Tensor] = {}
            for k, fn in variants.items():  # warm-up
                _time(fn, device)
            for _ in range(repeats):  # interleaved timed runs
                for k, fn in variants.items():
                    dt, outs[k] = _time(fn, device)
                    times[k].append(dt)
            for k in variants:
                entry = {
                    "shape": [rows, cols], "pattern": str(sp), "unit": what, "solver": k, **_stats(times[k]),
                    "rel_recon_error": rel_error(W, outs[k], H), "density": float((outs[k] != 0).float().mean()),
                }
                if k != "obs-diff":
                    entry["mask_agreement_with_obs_diff"] = float(((outs["obs-diff"] != 0) == (outs[k] != 0)).float().mean())
                results.append(entry)
                log.info("%dx%d %s %s: median %.3f s, rel. error %.4f", rows, cols, sp, k, entry["median_s"], entry["rel_recon_error"])
        del H, W
    return results


def main(argv: list[str] | None = None) -> int:
    ap = program.parser("solver_speed", __doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per variant after one warm-up (default 3)")
    ap.add_argument("--patterns", default="", help=f"also sweep these patterns (comma-separated; e.g. {','.join(PATTERNS)}); default none")
    ap.add_argument("--percdamp", type=float, default=DEFAULT_PERCDAMP, help=f"damping for both solvers (default {DEFAULT_PERCDAMP})")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2; 0: torch's default)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the SD3-medium dimensions by this (default 1; e.g. 0.25 for a quick check)")
    ap.add_argument("--modelopt-path", default=os.pathsep.join(["/tmp/mo-pkgs", "/tmp/mo-deps"]),
                    help="extra sys.path entries where nvidia-modelopt (and its deps) were pip-installed with --target")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    return program.run(ap, argv, run)


def run(args) -> int:
    program.check_out(args.out)
    program.set_threads(args.threads)
    device = program.resolve_device(args.device)

    def scaled(n: int) -> int:
        return max(128, int(round(n * args.scale / 128)) * 128)

    shape_map = {s: (scaled(s[0]), scaled(s[1])) for s in SHAPES}
    shapes = list(shape_map.values())
    counts = {shape_map[s]: c for s, c in SD3_MEDIUM_LAYERS.items()}
    bench: dict[str, Any] = {
        "benchmark": "solver_speed",
        **program.environment(device, ("torch",)),
        "settings": {"repeats": args.repeats, "percdamp": args.percdamp, "blocksize": DEFAULT_BLOCKSIZE, "head_dim": HEAD_DIM, "scale": args.scale, "threads": torch.get_num_threads()},
        "reference": "SparseGPT fasterprune (IST-DASLab/sparsegpt algorithm, written out in benchmarks/solver_speed.py)",
        "sd3_medium_2of4": whole_model_2of4(shapes, counts, repeats=args.repeats, percdamp=args.percdamp, device=device),
    }
    patterns = program.split_list(args.patterns)
    if patterns:
        sgpt, mo_note = load_modelopt(args.modelopt_path)
        log.info("%s", mo_note)
        bench["modelopt"] = mo_note
        bench["modelopt_notes"] = "create_sgpt_mask supports N:M only and returns a mask; its weights here are the masked originals (no OBS update)"
        bench["results"] = pattern_sweep(shapes, patterns, repeats=args.repeats, percdamp=args.percdamp, device=device, sgpt=sgpt)
    program.write(args.out, bench, markdown(bench), echo=True)
    return 0


def markdown(bench: dict[str, Any]) -> str:
    s = bench["settings"]
    lines = [
        "# OBS solver speed on SD3-medium layer shapes",
        "",
        f"Device: {bench['device']}; torch {bench['versions']['torch']}. Reference: {bench['reference']}. "
        f"Median of {s['repeats']} interleaved rounds after one warm-up; time ratio = median over rounds of ours / reference.",
        "",
        "## 2:4, ours vs reference SparseGPT",
        "",
        "Factor: ours `inverse_cholesky_upper` (U), reference Cholesky -> inverse -> Cholesky. Loop: the solve given that factor. "
        "Ours whole solve factorises without forming U.",
        "",
        "| W (out x in) | layers (shared input) | ours s | reference s | time ratio | ours factor s | ref. factor s | ours loop s | ref. loop s | ours rel. error | ref. rel. error | error ratio | mask agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sec = bench["sd3_medium_2of4"]
    for e in sec["shapes"]:
        c = e["count"]
        lines.append(
            f"| {e['shape'][0]}x{e['shape'][1]} | {c.get('layers', '')} ({c.get('shared_layers', '')}) | {e['ours_full']['median_s']:.3f} | {e['reference_full']['median_s']:.3f} | "
            f"**{e['time_ratio']:.3f}** | {e['ours_factor']['median_s']:.3f} | {e['reference_factor']['median_s']:.3f} | {e['ours_loop']['median_s']:.3f} | "
            f"{e['reference_loop']['median_s']:.3f} | {e['ours_rel_error']:.5f} | {e['reference_rel_error']:.5f} | **{e['error_ratio']:.5f}** | {e['mask_agreement']:.5f} |"
        )
    w = sec["whole_model"]
    if w:
        lines += [
            "",
            f"Whole SD3-medium 2:4 solve (a layer with its own Hessian: one whole solve; q/k/v and add_q/k/v: one factor per Hessian, "
            f"then a loop per layer; the same for both): ours {w['ours_s']['median_s']:.1f} s, reference {w['reference_s']['median_s']:.1f} s, "
            f"**time ratio {w['time_ratio']:.3f}** (target <= {w['target_time_ratio']}); "
            f"against the reference solving every layer whole, as SparseGPT runs ({w['reference_unshared_s']['median_s']:.1f} s): {w['time_ratio_vs_unshared']:.3f}. "
            f"Reconstruction-error ratio {w['error_ratio']:.5f} (worst shape {w['max_shape_error_ratio']:.5f}, limit {w['error_ratio_limit']}). "
            f"Target met: {'yes' if w['meets_target'] else 'no'}.",
        ]
    if "results" in bench:
        lines += [
            "",
            "## Pattern sweep",
            "",
            f"ModelOpt: {bench['modelopt']}. {bench['modelopt_notes']}.",
            "",
            "| W (out x in) | pattern | unit | solver | median s | min s | max s | rel. recon. error | density |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in bench["results"]:
            lines.append(
                f"| {r['shape'][0]}x{r['shape'][1]} | {r['pattern']} | {r['unit']} | {r['solver']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                f"{r['max_s']:.3f} | {r['rel_recon_error']:.4f} | {r['density']:.3f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
