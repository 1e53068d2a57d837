"""runtime.torch_int4 on the CPU: torchao's tinygemm INT4 tensors built from given codes (PyTorch's CPU tinygemm
kernel runs the same format as the CUDA one), stage 1's codes taken from a compact layer, and what torchao's own
quantizer makes of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tolerances import sum_rtol

pytest.importorskip("torchao", reason="needs torchao (`make setup` installs it: the torch-gpu extra)")


def _grid(n: int, k: int, group: int, seed: int = 0):
    """Random codes in [-8, 7] and float16-exact positive scales: ``(codes int8 (n, k), scales float32 (n, k/group))``."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand((n, k // group), generator=g) * 0.02 + 1e-3).to(torch.float16).to(torch.float32)
    return codes, scales


def test_cpu_tinygemm_computes_codes_times_scales():
    from runtime.torch_int4 import int4_weight

    k, group = 512, 128
    codes, scales = _grid(48, k, group)
    w = codes.to(torch.float32) * scales.repeat_interleave(group, 1)  # (48, 512), exact in float32
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    got = nn.functional.linear(x, int4_weight(codes, scales, group, dtype=torch.float32, device="cpu"))
    ref = x @ w.T
    # the same float32 products summed in another order over K=512: sum_rtol(512) ~ 6e-5 of sum|terms| (measured 9e-7 of
    # max |ref|); a code off by one step, a swapped nibble or a transposed layout moves the output by >1e-2
    assert (got - ref).abs().max() <= sum_rtol(k) * (x.abs() @ w.abs().T).max()
    flipped = codes.clone()
    flipped[:, 0::2], flipped[:, 1::2] = codes[:, 1::2], codes[:, 0::2]  # the other nibble order
    bad = nn.functional.linear(x, int4_weight(flipped, scales, group, dtype=torch.float32, device="cpu"))
    assert (bad - ref).abs().max() > 1e-2 * ref.abs().max()


def test_quantize_int4_takes_stage1_codes_and_leaves_other_groups():
    from obsdiff.weight_quant import WeightQuant
    from runtime.torch_int4 import LAYER_TOLERANCE, quantize_int4_

    codes, scales = _grid(64, 256, 128, seed=2)
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.copy_(codes.to(torch.float32) * scales.repeat_interleave(128, 1))
    # what export.int_weights attaches to a layer of a --weight-bits 4 compact checkpoint
    model[0].weight_quant, model[0].weight_scales, model[0].weight_columns = WeightQuant(4, 128), scales, None
    x = torch.randn(3, 256)
    ref = model(x)
    report = quantize_int4_(model, ["0", "1"], 128)
    assert report.converted == ["0"] and report.codes_from == "stage 1"
    assert report.left == {"1": "K=64 is not a multiple of the group size 128"}
    assert report.ok and report.layer_max_rel_error <= LAYER_TOLERANCE and report.scale_rounding == 0.0  # float32 scales: exact
    # float32 activations: the same products as the float layer, summed in another order (sum_rtol over K=256, then a
    # 64-term layer; measured 5e-7 of max |out|)
    assert (model(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert report.requantization["layer"] == "0"


def test_torchao_requantization_counts_the_codes_its_own_grid_keeps():
    from obsdiff.weight_quant import WeightQuant, codes_of, rtn_quantize
    from runtime.torch_int4 import torchao_requantization

    # every group spans [-8, 7]: torchao's asymmetric min/max grid is then exactly ours (scale (7 - -8) s / 15, zero 0)
    codes, scales = _grid(32, 256, 128, seed=3)
    codes[:, 0::128], codes[:, 1::128] = -8, 7
    same = torchao_requantization(codes, scales, 128)
    assert same["codes_kept"] == 1.0 and same["weight_rel_error"] < 1e-6  # float32 rounding of scale and zero only
    # stage 1's grid on real-looking weights (amax / 7: codes in [-7, 7], asymmetric groups): another grid, other codes
    wq = WeightQuant(4, 128, "rtn")
    w, s = rtn_quantize(torch.randn(32, 256, generator=torch.Generator().manual_seed(4)), wq)
    other = torchao_requantization(codes_of(w, s, wq), s, 128)
    assert other["codes_kept"] < 0.9 and other["weight_rel_error"] > 0.01  # measured 0.38 and 0.11


def test_codes_outside_4_bits_are_refused():
    from runtime.torch_int4 import int4_weight

    codes, scales = _grid(8, 128, 128)
    codes[0, 0] = 9
    with pytest.raises(ValueError, match=r"outside \[-8, 7\]"):
        int4_weight(codes, scales, 128, dtype=torch.float32, device="cpu")
