"""Solver speed on SD3-medium layer shapes, with NVIDIA ModelOpt's SparseGPT as a side-by-side reference.

Shapes are ``W (out, in)`` of SD3-medium's transformer blocks (hidden 1536, FFN 6144):
``1536x1536`` (q/k/v, attention outputs), ``6144x1536`` (``ff.net.0.proj``), ``1536x6144`` (``ff.net.2``).
``H`` is the exact second moment of real-like correlated inputs (low-rank shared structure with a decaying
spectrum, per-channel noise, a non-zero mean and a few outlier channels), built in closed form so a 6144-wide
Hessian costs no 6144-wide data matrix.

Per shape and granularity our solver runs (``obs_prune`` for 2:4, 4:8, unstructured 0.5; ``obs_prune_groups``
for structured 0.3: heads of 64 on the attention-output shape, neurons on the FFN-output shape), interleaved
with ``modelopt.torch.sparsity.weight_sparsity.sparsegpt.create_sgpt_mask`` (N:M only; it returns a mask, so its
weights are the masked originals) where ModelOpt imports. Reported: median / min / max seconds over
``--repeats`` timed runs after one warm-up, and the relative reconstruction error
``tr(dW H dW^T) / tr(W H W^T)`` of each result.

    python -m benchmarks.solver_speed [--device cuda] [--out artifacts/bench/solver_speed.json]
        [--modelopt-path /tmp/mo-pkgs:/tmp/mo-deps]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.io import atomic_path, write_json
from obsdiff.baselines import magnitude_prune
from obsdiff.patterns import parse_sparsity
from obsdiff.solvers import obs_prune, obs_prune_groups

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "artifacts" / "bench" / "solver_speed.json"
SHAPES = [(1536, 1536), (6144, 1536), (1536, 6144)]
PATTERNS = ["2:4", "4:8", "unstructured:0.5", "structured:0.3"]
HEAD_DIM = 64


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


def rel_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    D = W.float() - W_new.float()
    return float(((D @ H) * D).sum() / ((W.float() @ H) * W.float()).sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.solver_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant after one warm-up (default 3)")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--percdamp", type=float, default=0.01, help="damping for both solvers (default 0.01)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    ap.add_argument("--modelopt-path", default=os.pathsep.join(["/tmp/mo-pkgs", "/tmp/mo-deps"]),
                    help="extra sys.path entries where nvidia-modelopt (and its deps) were pip-installed with --target")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    sgpt, mo_note = load_modelopt(args.modelopt_path)
    log.info("%s", mo_note)

    results = []
    for rows, cols in SHAPES:
        H = correlated_hessian(cols, device=device)
        W = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * 0.02).to(device)
        for pattern in [p.strip() for p in args.patterns.split(",") if p.strip()]:
            sp = parse_sparsity(pattern)
            variants: dict[str, Callable[[], torch.Tensor]] = {}
            if sp.kind == "structured":
                if rows == cols:  # attention output: heads of HEAD_DIM columns
                    groups, gsize, what = cols // HEAD_DIM, HEAD_DIM, "heads"
                elif cols > rows:  # FFN output: neurons
                    groups, gsize, what = cols, 1, "neurons"
                else:
                    continue  # FFN input rows are cut by stage 2 from the output layer's decision
                n_remove = int(round(sp.ratio * groups))
                variants["obs-diff"] = lambda W=W, H=H, g=gsize, n=n_remove: obs_prune_groups([W], [H], g, n, percdamp=args.percdamp)[0][0]
            else:
                what = "weights"
                variants["obs-diff"] = lambda W=W, H=H, sp=sp: obs_prune(W, H, sp, percdamp=args.percdamp)[0]
                variants["magnitude"] = lambda W=W, sp=sp: magnitude_prune(W, None, sp)[0]
                if sgpt is not None and sp.kind == "nm":
                    cfg = {"pattern": f"{sp.n}:{sp.m} sparsity", "hessian_damp": args.percdamp, "col_block_size": 128, "row_block_size": -1}
                    variants["modelopt-sparsegpt"] = lambda W=W, H=H, cfg=cfg: W * sgpt(W, H.clone(), cfg)
            times: dict[str, list[float]] = {k: [] for k in variants}
            outs: dict[str, torch.Tensor] = {}
            for k, fn in variants.items():  # warm-up
                _time(fn, device)
            for _ in range(args.repeats):  # interleaved timed runs
                for k, fn in variants.items():
                    dt, outs[k] = _time(fn, device)
                    times[k].append(dt)
            for k in variants:
                entry = {
                    "shape": [rows, cols], "pattern": str(sp), "unit": what, "solver": k,
                    "median_s": statistics.median(times[k]), "min_s": min(times[k]), "max_s": max(times[k]),
                    "rel_recon_error": rel_error(W, outs[k], H), "density": float((outs[k] != 0).float().mean()),
                }
                results.append(entry)
                log.info("%dx%d %s %s: median %.3f s, rel. error %.4f", rows, cols, sp, k, entry["median_s"], entry["rel_recon_error"])
            if "modelopt-sparsegpt" in outs:
                same = float(((outs["obs-diff"] != 0) == (outs["modelopt-sparsegpt"] != 0)).float().mean())
                results[-1]["mask_agreement_with_obs_diff"] = same
        del H, W

    import diffusers

    bench = {
        "benchmark": "solver_speed",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "modelopt": mo_note,
        "modelopt_notes": "create_sgpt_mask supports N:M only and returns a mask; its weights here are the masked originals (no OBS update)",
        "settings": {"repeats": args.repeats, "percdamp": args.percdamp, "blocksize": 128, "head_dim": HEAD_DIM},
        "results": results,
    }
    out = Path(args.out)
    write_json(out, bench)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(bench))
    print(markdown(bench))
    return 0


def markdown(bench: dict[str, Any]) -> str:
    lines = [
        "# OBS solver speed on SD3-medium layer shapes",
        "",
        f"Device: {bench['device']}. Reference: {bench['modelopt']}. {bench['modelopt_notes']}.",
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
