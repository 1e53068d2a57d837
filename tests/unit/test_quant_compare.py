"""The 4-bit peers' benchmarks (benchmarks.quant_compare, benchmarks.quant_prune_cost): ModelOpt INT4 AWQ restricted to
the given layers, on a real ModelOpt quantization; the relative output error; the goal and default verdicts; the cost
ratios."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.prune_compare import relative_error
from benchmarks.quant_compare import add_added_error, awq_config, awq_quantize, defaults, goal_check, round_layers
from benchmarks.quant_prune_cost import ratios, summarise
from common.errors import UserError
from obsdiff.weight_quant import WeightQuant, on_grid, rtn_quantize


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = nn.Linear(64, 96)
        self.proj_out = nn.Linear(96, 64)  # a name ModelOpt's stock INT4_AWQ_CFG keeps in high precision (Flux's single blocks)
        self.norm_out = nn.Linear(64, 64)  # not given: must stay float

    def forward(self, x):
        return self.norm_out(self.proj_out(torch.nn.functional.gelu(self.ff(x))))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _inputs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, 64, generator=g) * torch.linspace(0.2, 3.0, 64) for _ in range(n)]  # uneven channels: AWQ's case


def test_awq_quantizes_exactly_the_given_layers_to_int4_blocks():
    torch.manual_seed(0)
    model = _Model().eval()
    ref = copy_outputs(model)
    layers = ["blocks.0.ff", "blocks.0.proj_out", "blocks.1.proj_out"]
    calls = []

    def loop(m):
        calls.append(1)
        with torch.no_grad():
            for x in _inputs():
                m(x)

    awq_quantize(model, layers, 32, loop)
    assert len(calls) == 2  # awq_lite: activation statistics, then the search
    modules = dict(model.named_modules())
    for name in layers:
        q = modules[name].weight_quantizer(modules[name].weight.detach())  # the weight the layer computes with (scaled by AWQ)
        blocks = q.reshape(q.shape[0], -1, 32)  # (rows, blocks, 32)
        # 4 bits: at most 16 distinct values in each block of 32 input columns (a float weight has 32)
        distinct = max(len(torch.unique(blocks[r, b])) for r in range(blocks.shape[0]) for b in range(blocks.shape[1]))
        assert distinct <= 16, (name, distinct)
    for name in ("blocks.0.norm_out", "blocks.1.ff"):
        assert not modules[name].weight_quantizer.is_enabled
    out = copy_outputs(model)
    err = relative_error(out, ref)
    # 4-bit blocks of 32 on 3 of 6 layers: measured 0.015 (three seeds); no quantizer on gives 0. Bounds: > 1e-3 (it did
    # quantize), < 0.08 (5x the measured value: a scale applied to the input but not undone in the weight is far above).
    assert 1e-3 < err < 0.08, err


def copy_outputs(model):
    with torch.no_grad():
        return [model(x).clone() for x in _inputs(3, seed=1)]


def test_awq_config_overrides_the_stock_exclusions_and_rejects_bad_values():
    cfg = awq_config(["single_transformer_blocks.0.proj_out"], 64)
    entries = cfg["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    assert [e["quantizer_name"] for e in entries[1:]] == ["single_transformer_blocks.0.proj_out.weight_quantizer"]
    assert entries[1]["cfg"]["num_bits"] == 4 and entries[1]["cfg"]["block_sizes"][-1] == 64
    assert cfg["algorithm"]["method"] == "awq_lite"
    assert awq_config([], 128, "awq_full")["algorithm"]["method"] == "awq_full"
    with pytest.raises(UserError, match="awq_lite, awq_full"):
        awq_config([], 128, "gptq")


def test_round_layers_puts_the_given_layers_on_the_grid_only():
    torch.manual_seed(0)
    model = _Model()
    before = model.blocks[1].ff.weight.detach().clone()
    wq = WeightQuant(4, 32, "rtn")
    round_layers(model, ["blocks.0.ff"], wq)
    w = model.blocks[0].ff.weight.detach()
    assert on_grid(w, rtn_quantize(w, wq)[1], wq)
    assert torch.equal(model.blocks[1].ff.weight.detach(), before)  # copied, not computed: exact


def test_relative_error_pools_every_call():
    refs = [torch.ones(2, 3), 2 * torch.ones(1, 3)]
    outs = [torch.ones(2, 3), 2 * torch.ones(1, 3) + 1]
    # sqrt(sum of squared differences / sum of squared references) = sqrt(3 / (6 + 12)); float32 sums of 9 terms
    assert relative_error(outs, refs) == pytest.approx((3 / 18) ** 0.5, rel=1e-6)
    with pytest.raises(ValueError):
        relative_error(outs[:1], refs)


def _rows(obs, rtn, awq, pattern="dense", group=128, rtn_float=None):
    rows = [{"pattern": pattern, "group_size": group, "method": "obs", "error_vs_dense": obs, "error_vs_float": obs},
            {"pattern": pattern, "group_size": group, "method": "rtn", "error_vs_dense": rtn, "error_vs_float": rtn},
            {"pattern": pattern, "group_size": group, "method": "awq", "error_vs_dense": awq, "error_vs_float": awq}]
    if rtn_float is not None:
        rows.append({"pattern": pattern, "group_size": group, "method": "rtn-of-float", "error_vs_dense": rtn_float, "error_vs_float": rtn_float})
    return rows


def test_goal_and_default_verdicts():
    rows = _rows(0.02, 0.05, 0.03) + _rows(0.12, 0.13, 0.125, pattern="2:4")
    g = goal_check(rows)
    assert g["patterns"]["dense"]["error_vs_dense"]["met"] and not g["patterns"]["2:4"]["error_vs_dense"]["met"]
    assert g["met"] is False
    assert g["patterns"]["2:4"]["error_vs_dense"]["obs_over_rtn"] == pytest.approx(0.12 / 0.13)
    # the stronger round-to-nearest counts: rtn-of-float 0.03 makes OBS's 0.02 more than half of it
    g2 = goal_check(_rows(0.02, 0.05, 0.03, rtn_float=0.03) + _rows(0.01, 0.05, 0.03, pattern="2:4"))
    assert g2["patterns"]["dense"]["error_vs_dense"]["rtn_method"] == "rtn-of-float" and g2["met"] is False
    assert goal_check(_rows(0.02, 0.05, 0.03))["met"] is None  # 2:4 not measured
    # what 4 bits add to 2:4's float error of 0.12: sqrt(0.13^2 - 0.12^2) = 0.05 for RTN, 0 for OBS at 0.12 (float32
    # arithmetic on numbers of order 0.01: rel 1e-6)
    rows24 = [{"pattern": "2:4", "group_size": None, "method": "float", "error_vs_dense": 0.12, "error_vs_float": 0.0},
              *_rows(0.12, 0.13, 0.125, pattern="2:4")]
    add_added_error(rows24)
    assert [r.get("added_error") for r in rows24] == [None, 0.0, pytest.approx(0.05, rel=1e-6), pytest.approx(0.035, rel=1e-6)]
    assert goal_check(rows24, patterns=("2:4",))["patterns"]["2:4"]["added_error"]["met"]
    d = defaults(rows + _rows(0.2, 0.19, 0.3, pattern="structured:0.3"))
    assert d["dense g128"]["obs_default"] and d["2:4 g128"]["obs_default"]
    assert not d["structured:0.3 g128"]["obs_default"] and d["structured:0.3 g128"]["lowest"] == "rtn"


def test_cost_ratios_of_medians():
    runs = {"2:4 float": [{"seconds": s, "peak_rss_mib": 500.0, "rise_mib": 100.0} for s in (10.0, 12.0, 30.0)],
            "2:4 w": [{"seconds": s, "peak_rss_mib": 520.0, "rise_mib": 130.0} for s in (11.0, 13.0, 14.0)],
            "dense w": [{"seconds": 9.0, "peak_rss_mib": 700.0, "rise_mib": 300.0}]}
    summary = {k: summarise(v) for k, v in runs.items()}
    assert summary["2:4 float"]["seconds"] == 12.0 and summary["2:4 float"]["seconds_max"] == 30.0
    r = ratios(summary, ["2:4", "dense"])
    assert r["2:4"]["seconds"] == pytest.approx(13 / 12) and r["2:4"]["within_goal"]
    assert r["dense"]["reference"] == "2:4 float" and r["dense"]["peak_rss_mib"] == pytest.approx(1.4) and not r["dense"]["within_goal"]
