"""The Pareto report: the front of (latency, quality) points, the grid's stages (make engine's settings and
directories, reused), the report files, and a small end-to-end run on tiny-sd3 that a rerun serves from the store."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.pareto import FP8_NOTE, add_args, config_id, fronts, pareto_front, plan_grid, plot, to_markdown
from common.errors import UserError


def _args(*argv):
    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args(list(argv))


def test_front_of_latency_and_quality():
    pts = [(10.0, 0.9), (12.0, 0.95), (11.0, 0.8), (20.0, 0.95), (9.0, 0.5), (15.0, 0.99)]
    # (11, 0.8) is dominated by (10, 0.9); (20, 0.95) by (12, 0.95): equal quality, slower
    assert pareto_front(pts) == [0, 1, 4, 5]
    # lower is better (Fréchet distance): (9, 0.5) is the fastest and the best; a slower point must be better to stay
    assert pareto_front(pts, higher_is_better=False) == [4]
    assert pareto_front([(9.0, 0.5), (11.0, 0.3), (12.0, 0.3), (13.0, 0.1)], higher_is_better=False) == [0, 1, 3]
    # equal points do not dominate each other; missing or non-finite values are never on the front
    assert pareto_front([(1.0, 1.0), (1.0, 1.0), (0.5, None), (0.1, math.nan), (math.inf, 2.0)]) == [0, 1]
    assert pareto_front([]) == [] and pareto_front([(3.0, 0.1)]) == [0]
    # a faster and better point dominates everything
    assert pareto_front([(5.0, 0.5), (1.0, 1.0), (2.0, 0.9)]) == [1]


def _variant(sparsity, precision, ms, acc, fd):
    return {"sparsity": sparsity, "precision": precision, "latency_ms": {"median": ms, "p90": ms * 1.1}, "transformer_step_ms": ms / 20,
            "speedup_vs_reference": 100.0 / ms, "transformer_onnx_mib": 1.0, "gemm_flop_ratio": 1.0,
            "quality": {"prompt_accuracy": acc, "frechet_distance": fd}}


def test_fronts_table_and_plot(tmp_path):
    variants = {"dense fp32": _variant("dense", "fp32", 100.0, 1.0, 250.0), "dense int8": _variant("dense", "int8", 60.0, 1.0, 260.0),
                "structured:0.5 int8": _variant("structured:0.5", "int8", 45.0, 0.9, 255.0),
                "structured:0.5 fp32": _variant("structured:0.5", "fp32", 70.0, 0.9, 240.0)}
    f = fronts(variants)
    assert f == {"prompt_accuracy": ["dense int8", "structured:0.5 int8"], "frechet_distance": ["structured:0.5 int8", "structured:0.5 fp32"]}
    report = {"model": "tiny-sd3", "variants": variants, "fronts": f, "device": {"summary": "a CPU"}, "elapsed_s": 1.0,
              "stages": [{"stage": "prune", "seconds": 1.0, "reused": True}], "notes": [FP8_NOTE],
              "settings": {"reference": "dense fp32", "steps": 20, "runs": 1, "warmup": 0, "threads": 1, "quality_seeds": [0]}}
    md = to_markdown(report)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert [r.split(" | ")[0].strip("| *") for r in rows] == ["structured:0.5 int8", "dense int8", "structured:0.5 fp32", "dense fp32"]  # by latency
    assert rows[0].endswith("| accuracy, FD |") and rows[-1].endswith("| - |") and "fp8 not benchmarked" in md
    path = plot(report, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_dirs_are_make_engines_with_its_calibration():
    from obsdiff.patterns import parse_sparsity

    sp = parse_sparsity("structured:0.3")
    assert config_id(sp, "obs-diff", 64, None) == "structured-0.3-obs-diff"  # make engine's directory: shared
    assert config_id(sp, "obs-diff", 16, None) == "structured-0.3-obs-diff-s16"
    assert config_id(parse_sparsity("2:4"), "wanda", 16, 4) == "2-4-wanda-s16-t4"


def test_grid_plan_uses_make_engines_export_settings(tmp_path):
    from benchmarks.pareto import parse_grid
    from export.stage import ExportSettings
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from pipeline.artifacts import config_dirs
    from pipeline.engine import parse_args, plan_stages

    spec = resolve_model("tiny-sd3")
    args = _args("--grid", "dense,2:4,structured:0.3", "--samples", "64", "--precisions", "fp32,int8,fp8")
    plan = plan_grid(args, spec, parse_grid(args.grid), ["fp32", "int8", "fp8"], tmp_path)
    names = [s.name for s in plan.stages]
    assert names == ["export dense fp32", "export dense int8", "prune 2:4", "export 2:4 fp32", "export 2:4 int8", "prune structured:0.3",
                     "export structured:0.3 fp32", "export structured:0.3 int8"]  # fp8: not runnable on ONNX Runtime
    by = {s.name: s.settings for s in plan.stages}
    assert by["export dense fp32"].components is None and by["export 2:4 int8"].components == ("transformer",)
    assert plan.shared == config_dirs(spec, "dense", tmp_path).export
    # with make engine's calibration the grid uses make engine's directories and stage-1/INT8 settings
    eng_args = parse_args(["--artifacts", str(tmp_path), "--sparsity", "2:4", "--precision", "int8"])
    cfg, dense = config_dirs(spec, "2-4-obs-diff", tmp_path), config_dirs(spec, "dense", tmp_path)
    engine = {s.name: s.settings for s in plan_stages(eng_args, spec, parse_sparsity("2:4"), cfg, dense, cuda=False, bench_backend="ort")}
    assert by["prune 2:4"] == engine["prune"]
    mine, theirs = by["export 2:4 int8"], engine["export_pruned_int8"]
    assert isinstance(mine, ExportSettings) and (mine.out, mine.pruned, mine.calibration, mine.other_precision) == (
        theirs.out, theirs.pruned, theirs.calibration, theirs.other_precision)
    assert by["export dense int8"].calibration == engine["export_dense_int8"].calibration
    assert not tmp_path.joinpath("tiny-sd3").exists()  # planning creates nothing


def test_nothing_runnable_is_one_line(tmp_path):
    from benchmarks.pareto import run_pareto

    with pytest.raises(UserError, match="nothing to benchmark: fp8 not benchmarked"):
        run_pareto(_args("--precisions", "fp8", "--artifacts", str(tmp_path)))
    with pytest.raises(UserError, match="unknown sparsity"):
        run_pareto(_args("--grid", "dense,3:4", "--artifacts", str(tmp_path)))


@pytest.mark.slow  # the whole grid end to end (about 2 minutes on 2 cores); the pieces have unit tests above
def test_small_grid_end_to_end_then_reused(tmp_path):
    """dense and structured:0.3, fp32 and int8, on tiny-sd3 with minimal calibration and benchmark settings
    (~40 s on 2 cores); the rerun finds every stage done."""
    from benchmarks.pareto import run_pareto
    from tests.runtime_fixtures import tiny_sd3

    tiny_sd3()  # skips without the embedded model
    argv = ["--grid", "dense,structured:0.3", "--precisions", "fp32,int8", "--method", "magnitude", "--samples", "2", "--calib-steps", "3",
            "--quant-samples", "1", "--quant-calls", "4", "--runs", "1", "--warmup", "0", "--quality-seeds", "1", "--steps", "3",
            "--artifacts", str(tmp_path)]
    report = run_pareto(_args(*argv))
    out = tmp_path / "tiny-sd3" / "pareto"
    assert set(report["variants"]) == {"dense fp32", "dense int8", "structured:0.3 fp32", "structured:0.3 int8"}
    for name, v in report["variants"].items():
        assert v["latency_ms"]["median"] > 0 and 0 <= v["quality"]["prompt_accuracy"] <= 1 and v["quality"]["n_images"] == 10
    assert report["variants"]["structured:0.3 int8"]["gemm_flop_ratio"] < 1
    assert set(report["fronts"]) == {"prompt_accuracy", "frechet_distance"} and report["fronts"]["prompt_accuracy"]
    assert report["config_dirs"]["structured:0.3 int8"] == str(tmp_path / "tiny-sd3" / "structured-0.3-magnitude-s2-t3")
    saved = json.loads((out / "pareto.json").read_text())
    assert saved["fronts"] == report["fronts"] and (out / "pareto.png").stat().st_size > 0 and "| variant |" in (out / "pareto.md").read_text()
    assert not any(s["reused"] for s in report["stages"])
    again = run_pareto(_args(*argv, "--no-quality"))
    assert all(s["reused"] for s in again["stages"]) and again["fronts"] == {}
