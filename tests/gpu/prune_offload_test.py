"""Stage 1 on CUDA: solvers on the GPU agree with the CPU, and pruning through diffusers' CPU offload
(model and sequential) gives the same result as a pipeline held on the GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA (offload and GPU solvers)"),
]


def test_gpu_solvers_agree_with_cpu():
    from obsdiff.patterns import parse_sparsity
    from obsdiff.solvers import obs_prune, obs_prune_groups
    from tests.prune_helpers import correlated_inputs

    X = correlated_inputs(4096, 512)
    H = X.T @ X / X.shape[0]
    W = torch.randn(384, 512) * 0.05
    for pattern in ("2:4", "unstructured:0.5"):
        sp = parse_sparsity(pattern)
        w_cpu, k_cpu = obs_prune(W, H, sp)
        w_gpu, k_gpu = obs_prune(W.cuda(), H.cuda(), sp)
        assert w_gpu.is_cuda
        # GPU vs CPU kernels sum in other orders: a near-tied group may flip (tests/tolerances.py), and a flip changes
        # the OBS update of the rest of its row. So: masks agree on 99.9% of the weights, and the rows whose masks agree
        # carry the same weights to float32 rounding times kappa(H + 1% damping)
        agree = k_gpu.cpu() == k_cpu  # (rows, cols)
        rows = agree.all(dim=1)
        assert agree.float().mean() > 0.999 and rows.float().mean() > 0.9
        assert torch.linalg.norm(w_gpu.cpu()[rows] - w_cpu[rows]) / torch.linalg.norm(w_cpu[rows]) < 1e-3
    (g_cpu,), keep_cpu = obs_prune_groups([W], [H], 64, 2)
    (g_gpu,), keep_gpu = obs_prune_groups([W.cuda()], [H.cuda()], 64, 2)
    assert keep_gpu == keep_cpu


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_pruning_matches_the_gpu_pipeline(offload, tmp_path):
    from diffusers import SD3Transformer2DModel

    from obsdiff.packages import prune
    from tests.prune_helpers import digit_prompts, load_tiny_pipeline, small_config

    config = small_config("2:4")
    prompts = digit_prompts(config.calibration.samples)
    states = {}
    for mode in ("none", offload):
        pipe = load_tiny_pipeline()
        if mode == "none":
            pipe.to("cuda")
        elif mode == "model":
            pipe.enable_model_cpu_offload()
        else:
            pipe.enable_sequential_cpu_offload()
        plan = prune(pipe, "tiny-sd3", prompts, config, tmp_path / mode, progress=False)
        assert plan.complete
        states[mode] = SD3Transformer2DModel.from_pretrained(str(tmp_path / mode / "transformer")).state_dict()
    # Offloading moves weights, not arithmetic: the same CUDA kernels on the same inputs, expected equal. The bounds
    # leave room for a flip of a near-tied 2:4 group (tests/tolerances.py), which would also move its row's later
    # weights; a flip early in the first package would cascade through the recalibration beyond them.
    for name in (n for p in plan.packages for n in p):
        ref, got = states["none"][f"{name}.weight"], states[offload][f"{name}.weight"]
        groups = (got != 0).reshape(got.shape[0], -1, 4).sum(dim=2)
        assert bool((groups == 2).all()), name
        assert ((got != 0) == (ref != 0)).float().mean() > 0.999, name
        assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 1e-2, name


def test_cli_prunes_with_model_offload(tmp_path):
    from pipeline.__main__ import main
    from tests.prune_helpers import require_tiny_sd3

    require_tiny_sd3()
    out = tmp_path / "cli"
    rc = main(["prune", "--sparsity", "4:8", "--samples", "2", "--steps", "2", "--batch-size", "2", "--groups", "2",
               "--dtype", "float32", "--offload", "model", "--no-progress", "--out", str(out)])
    assert rc == 0 and (out / "plan.json").is_file() and (out / "transformer" / "config.json").is_file()
