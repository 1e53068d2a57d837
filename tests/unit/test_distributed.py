"""Scale-out: two CPU ranks (gloo) calibrate half the prompts each; the all-reduced Hessians and the
pruned transformer match a single-process run.

One prompt per rank and per pipeline call, one thread everywhere: the all-reduced sum ``s0 + s1`` is the single
process's ``(0 + s0) + s1``, so the two runs are one computation and agree bit for bit on any machine (measured equal:
Hessians, masks and weights, default and AVX2 kernels). That is what lets the 2:4 masks, chosen without a margin
(tests/tolerances.py), be compared exactly; the floats keep a 1e-5 relative bound, which a layout that reorders the
sums would have to revisit together with the masks."""

from __future__ import annotations

import os
import socket

import torch

from tests.prune_helpers import digit_prompts, load_tiny_pipeline, require_tiny_sd3, single_thread, small_config

WORLD = 2
PROBE = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2"]


def _config():
    # batch_size=1: every prompt is its own pipeline call in both runs, so only the summation order differs
    return small_config("2:4", groups=2, samples=2, steps=2, batch_size=1)


def _probe_hessians(pipe, ctx, prompts, config):
    """Hessians of PROBE layers on the dense model, calibrated on this rank's share and all-reduced."""
    from obsdiff.hessian import HessianCollector
    from obsdiff.packages import run_calibration

    modules = dict(pipe.transformer.named_modules())
    collector = HessianCollector({n: modules[n] for n in PROBE})
    with torch.no_grad():
        run_calibration(pipe, collector, ctx.shard(prompts), config.calibration)
    collector.ensure_all(ctx.device)
    ctx.all_reduce_sum(collector.tensors())
    return {n: collector.hessian(n) for n in PROBE}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from obsdiff.distributed import init_from_env, shutdown
    from obsdiff.packages import prune

    ctx = init_from_env("cpu")
    try:
        pipe = load_tiny_pipeline()
        config, prompts = _config(), digit_prompts(2)
        hessians = _probe_hessians(pipe, ctx, prompts, config)
        if ctx.is_main:
            torch.save(hessians, os.path.join(out, "hessians.pt"))
        prune(pipe, "tiny-sd3", prompts, config, os.path.join(out, "pruned"), ctx=ctx, progress=False)
    finally:
        shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_match_a_single_process(tmp_path):
    require_tiny_sd3()
    import torch.multiprocessing as mp
    from diffusers import SD3Transformer2DModel

    from obsdiff.distributed import DistContext
    from obsdiff.packages import prune
    from obsdiff.plan import PrunePlan

    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    dist_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(dist_dir)), nprocs=WORLD, join=True)

    with single_thread():
        pipe = load_tiny_pipeline()
        config, prompts = _config(), digit_prompts(2)
        ref_h = _probe_hessians(pipe, DistContext(), prompts, config)
        prune(pipe, "tiny-sd3", prompts, config, single_dir, progress=False)

    got_h = torch.load(dist_dir / "hessians.pt")
    for n in PROBE:
        rel = torch.linalg.norm(got_h[n] - ref_h[n]) / torch.linalg.norm(ref_h[n])
        assert rel < 1e-5, f"{n}: all-reduced Hessian differs by {rel:.2e}"

    plan_d = PrunePlan.load(dist_dir / "pruned" / "plan.json")
    plan_s = PrunePlan.load(single_dir / "plan.json")
    assert plan_d.to_dict() == plan_s.to_dict()
    got = SD3Transformer2DModel.from_pretrained(str(dist_dir / "pruned" / "transformer")).state_dict()
    ref = SD3Transformer2DModel.from_pretrained(str(single_dir / "transformer")).state_dict()
    for name in (n for p in plan_s.packages for n in p):
        a, b = got[f"{name}.weight"], ref[f"{name}.weight"]
        assert torch.equal(a != 0, b != 0), f"{name}: masks differ"
        rel = float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
        assert rel < 1e-5, f"{name}: pruned weights differ by {rel:.2e}"
