"""The Pareto report: the front of (latency, quality, memory) points, the grid's stages (make engine's settings and
directories, reused; the int4 points from their own --weight-bits 4 prunes), the report files, and a small
end-to-end run on tiny-sd3 that a rerun serves from the store."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.pareto import FP8_NOTE, add_args, config_id, fronts, latency_memory_front, pareto_front, plan_grid, plot, to_markdown
from common.errors import UserError


def _args(*argv):
    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args(list(argv))


LQ = (False, True)  # (latency: lower is better, quality: higher is better)


def test_front_of_latency_and_quality():
    pts = [(10.0, 0.9), (12.0, 0.95), (11.0, 0.8), (20.0, 0.95), (9.0, 0.5), (15.0, 0.99)]
    # (11, 0.8) is dominated by (10, 0.9); (20, 0.95) by (12, 0.95): equal quality, slower
    assert pareto_front(pts, maximize=LQ) == [0, 1, 4, 5]
    # lower is better (Fréchet distance): (9, 0.5) is the fastest and the best; a slower point must be better to stay
    assert pareto_front(pts, maximize=(False, False)) == [4]
    assert pareto_front([(9.0, 0.5), (11.0, 0.3), (12.0, 0.3), (13.0, 0.1)], maximize=(False, False)) == [0, 1, 3]
    # equal points do not dominate each other; missing or non-finite values are never on the front
    assert pareto_front([(1.0, 1.0), (1.0, 1.0), (0.5, None), (0.1, math.nan), (math.inf, 2.0)], maximize=LQ) == [0, 1]
    assert pareto_front([], maximize=LQ) == [] and pareto_front([(3.0, 0.1)], maximize=LQ) == [0]
    # a faster and better point dominates everything
    assert pareto_front([(5.0, 0.5), (1.0, 1.0), (2.0, 0.9)], maximize=LQ) == [1]


def test_front_in_three_axes():
    """(latency, quality, memory): a point leaves the front only to one at least as good on all three and better on one."""
    lqm = (False, True, False)
    pts = [(10.0, 0.9, 40.0),  # 0: the fast float point
           (12.0, 0.9, 20.0),  # 1: slower, same quality, half the memory: on the three-axis front, off the two-axis one
           (12.0, 0.9, 25.0),  # 2: dominated by 1 (more memory, nothing better)
           (11.0, 0.95, 40.0),  # 3: better quality than 0 at more latency: stays
           (13.0, 0.95, 20.0),  # 4: dominated by nobody: 1 is worse in quality, 3 in memory
           (14.0, 0.95, 20.0),  # 5: dominated by 4 (slower, the rest equal)
           (9.0, 0.5, 50.0),  # 6: the fastest
           (12.0, 0.9, 20.0),  # 7: equal to 1: both stay
           (8.0, None, 10.0)]  # 8: no quality: never on the front, dominates nothing
    assert pareto_front(pts, maximize=lqm) == [0, 1, 3, 4, 6, 7]
    assert pareto_front([p[:2] for p in pts], maximize=LQ) == [0, 3, 6]  # without memory: only speed and quality count
    # latency and memory alone: 3 is dominated by 0 (slower at the same memory), 4 by 1; with 8 in, it dominates all
    assert pareto_front([(p[0], p[2]) for p in pts[:8]], maximize=(False, False)) == [0, 1, 6, 7]
    assert pareto_front([(p[0], p[2]) for p in pts], maximize=(False, False)) == [8]
    # a missing memory figure keeps a point off the front
    assert pareto_front([(1.0, 1.0, None), (2.0, 0.5, 5.0)], maximize=lqm) == [1]
    # every axis counts: the point best on memory alone stays, even if the slowest and the worst
    assert pareto_front([(1.0, 1.0, 9.0), (9.0, 0.1, 1.0)], maximize=lqm) == [0, 1]


def _variant(sparsity, precision, ms, acc, fd, weights_mib):
    mib = 2**20
    rows = [{"component": "transformer", "precision": precision, "runtime": "onnx", "disk_bytes": int((weights_mib - 1) * mib)},
            {"component": "vae_decoder", "precision": "fp32", "runtime": "onnx", "disk_bytes": mib}]
    memory = {"weights": {"rows": rows, "total": {"disk_bytes": int(weights_mib * mib), "loaded_bytes": int(weights_mib * 1.1 * mib),
                                                  "dense_bytes": 40 * mib, "ratio": weights_mib * 1.1 / 40}, "dense_dtype": "float32"},
              "generation": {"peak_rss_bytes": int((500 + weights_mib) * mib), "baseline_rss_bytes": 450 * mib, "height": 32, "width": 32,
                             "steps": 20}}
    return {"sparsity": sparsity, "precision": precision, "latency_ms": {"median": ms, "p90": ms * 1.1}, "transformer_step_ms": ms / 20,
            "speedup_vs_reference": 100.0 / ms, "transformer_onnx_mib": 1.0, "gemm_flop_ratio": 1.0,
            "quality": {"prompt_accuracy": acc, "frechet_distance": fd}, "memory": memory}


def test_fronts_table_and_plot(tmp_path):
    variants = {"dense fp32": _variant("dense", "fp32", 100.0, 1.0, 250.0, 40.0), "dense int8": _variant("dense", "int8", 60.0, 1.0, 260.0, 22.0),
                "dense int4": _variant("dense", "int4", 80.0, 1.0, 262.0, 18.0),
                "structured:0.5 int8": _variant("structured:0.5", "int8", 45.0, 0.9, 255.0, 15.0),
                "structured:0.5 fp32": _variant("structured:0.5", "fp32", 70.0, 0.9, 240.0, 25.0)}
    f = fronts(variants, "weights")
    # dense int4: slower than dense int8 at the same accuracy, but smaller: on the three-axis accuracy front only;
    # structured:0.5 int8 is faster, smaller and closer (FD) than both dense INT points
    assert f == {"prompt_accuracy": ["dense int8", "dense int4", "structured:0.5 int8"], "frechet_distance": ["structured:0.5 int8", "structured:0.5 fp32"]}
    two = fronts(variants, None)
    assert two == {"prompt_accuracy": ["dense int8", "structured:0.5 int8"], "frechet_distance": ["structured:0.5 int8", "structured:0.5 fp32"]}
    assert latency_memory_front(variants, "weights") == ["structured:0.5 int8"]
    # the peak axis: dense int4's peak is the smallest after structured:0.5 int8's, the same order as its weights
    assert fronts(variants, "peak") == f
    report = {"model": "tiny-sd3", "variants": variants, "fronts": f, "fronts_latency_quality": two, "memory_axis": "weights",
              "front_latency_memory": latency_memory_front(variants, "weights"), "device": {"summary": "a CPU"}, "elapsed_s": 1.0,
              "stages": [{"stage": "prune", "seconds": 1.0, "reused": True}], "notes": [FP8_NOTE],
              "settings": {"reference": "dense fp32", "steps": 20, "runs": 1, "warmup": 0, "threads": 1, "quality_seeds": [0]}}
    md = to_markdown(report)
    table = md.split("\n\n")[1].splitlines()
    rows = [ln.split(" | ") for ln in table[2:]]
    assert [r[0].strip("| *") for r in rows] == ["structured:0.5 int8", "dense int8", "structured:0.5 fp32", "dense int4", "dense fp32"]  # by latency
    head = [h.strip("| ") for h in table[0].split(" | ")]
    col = {h: i for i, h in enumerate(head)}
    by = {r[0].strip("| *"): r for r in rows}
    assert by["dense int4"][col["weights MiB"]] == "18.00" and by["dense int4"][col["peak RSS MiB"]] == "518.0"
    assert by["dense int4"][col["front: latency, quality, memory"]] == "accuracy" and by["dense int4"][-1].strip("| ") == "-"
    assert by["structured:0.5 int8"][col["front: latency, quality, memory"]] == "accuracy, FD" == by["structured:0.5 int8"][-1].strip("| ")
    assert by["dense fp32"][-1].strip("| ") == "-" and by["dense fp32"][col["front: latency, quality, memory"]] == "-"
    assert "| dense int4 | 17.00 (int4) | 1.00 (fp32) | 18.00 |" in md and "fp8 not benchmarked" in md
    path = plot(report, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_dirs_are_make_engines_with_its_calibration():
    from obsdiff.patterns import parse_sparsity

    sp = parse_sparsity("structured:0.3")
    assert config_id(sp, "obs-diff", 64, None) == "structured-0.3-obs-diff"  # make engine's directory: shared
    assert config_id(sp, "obs-diff", 16, None) == "structured-0.3-obs-diff-s16"
    assert config_id(parse_sparsity("2:4"), "wanda", 16, 4) == "2-4-wanda-s16-t4"


def test_config_dirs_of_the_4bit_prunes():
    from obsdiff.patterns import parse_sparsity
    from pipeline.engine import weights_tail

    tail = weights_tail("int4")
    assert config_id(parse_sparsity("2:4"), "obs-diff", 64, None, tail) == "2-4-obs-diff-w4g128"  # make engine --precision int4's
    assert config_id(parse_sparsity("dense"), "obs-diff", 64, None, tail) == "dense-w4g128"
    assert config_id(parse_sparsity("dense"), "wanda", 16, 3, tail) == "dense-w4g128-s16-t3"


def _export_fields(settings):
    return (settings.out, settings.pruned, settings.precision, settings.calibration, settings.other_precision, settings.components,
            settings.share_from, settings.drop_t5)


def test_grid_plan_uses_make_engines_export_settings(tmp_path):
    from benchmarks.pareto import parse_grid
    from export.stage import ExportSettings
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from pipeline.artifacts import config_dirs
    from pipeline.engine import parse_args, plan_stages

    spec = resolve_model("tiny-sd3")
    args = _args("--grid", "structured:0.3,dense,2:4", "--samples", "64", "--precisions", "fp32,int8,int4,fp8")
    plan = plan_grid(args, spec, parse_grid(args.grid), ["fp32", "int8", "int4", "fp8"], tmp_path)
    names = [s.name for s in plan.stages]
    # dense first (the others link its text encoders and VAE); one float prune per sparsity, and a 4-bit one of its own
    # for int4 (dense too); fp8: not runnable on ONNX Runtime
    assert names == ["export dense fp32", "export dense int8", "prune dense int4", "export dense int4",
                     "prune structured:0.3", "export structured:0.3 fp32", "export structured:0.3 int8", "prune structured:0.3 int4",
                     "export structured:0.3 int4", "prune 2:4", "export 2:4 fp32", "export 2:4 int8", "prune 2:4 int4", "export 2:4 int4"]
    by = {s.name: s.settings for s in plan.stages}
    assert by["prune 2:4"].config.quant is None and by["prune 2:4 int4"].config.quant.bits == 4
    assert by["prune 2:4 int4"].out == tmp_path / "tiny-sd3" / "2-4-obs-diff-w4g128" / "prune"
    assert by["export 2:4 int4"].pruned == by["prune 2:4 int4"].out and by["export 2:4 int8"].pruned == by["prune 2:4"].out
    assert plan.exports["dense int4"] == config_dirs(spec, "dense-w4g128", tmp_path).export_for("int4")
    assert set(plan.exports) == {f"{sp} {p}" for sp in ("dense", "2:4", "structured:0.3") for p in ("fp32", "int8", "int4")}
    # every variant serves the whole pipeline: the dense exports make the text encoders and VAE, the others link them
    assert all(by[f"export {n}"].components is None for n in plan.exports)
    assert by["export 2:4 int4"].share_from == by["export dense int4"].out and by["export dense int4"].share_from is None
    # with make engine's calibration the grid uses make engine's directories, stage-1 and export settings
    for precision, pairs in (("int8", [("prune 2:4", "prune"), ("export 2:4 int8", "export_pruned_int8"), ("export dense int8", "export_dense_int8")]),
                             ("int4", [("prune 2:4 int4", "prune"), ("prune dense int4", "prune_dense"), ("export 2:4 int4", "export_pruned_int4"),
                                       ("export dense int4", "export_dense_int4")])):
        tail = "-w4g128" if precision == "int4" else ""
        eng_args = parse_args(["--artifacts", str(tmp_path), "--sparsity", "2:4", "--precision", precision, "--no-engines"])
        cfg, dense = config_dirs(spec, f"2-4-obs-diff{tail}", tmp_path), config_dirs(spec, f"dense{tail}", tmp_path)
        engine = {s.name: s.settings for s in plan_stages(eng_args, spec, parse_sparsity("2:4"), cfg, dense, cuda=False, bench_backend="ort")}
        for mine, theirs in pairs:
            if mine.startswith("prune"):
                assert by[mine] == engine[theirs], mine
            else:
                assert isinstance(by[mine], ExportSettings) and _export_fields(by[mine]) == _export_fields(engine[theirs]), mine
    assert not tmp_path.joinpath("tiny-sd3").exists()  # planning creates nothing


def test_grid_plan_with_quantized_modulations_is_make_engines(tmp_path):
    from benchmarks.pareto import parse_grid
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from pipeline.artifacts import config_dirs
    from pipeline.engine import parse_args, plan_stages

    spec = resolve_model("tiny-sd3")
    args = _args("--grid", "dense,2:4", "--samples", "64", "--precisions", "int4", "--quant-modulation")
    by = {s.name: s.settings for s in plan_grid(args, spec, parse_grid(args.grid), ["int4"], tmp_path).stages}
    assert list(by) == ["prune dense int4", "export dense int4", "prune 2:4 int4", "export 2:4 int4"]
    eng_args = parse_args(["--artifacts", str(tmp_path), "--sparsity", "2:4", "--precision", "int4", "--quant-modulation", "--no-engines"])
    cfg, dense = config_dirs(spec, "2-4-obs-diff-w4g128-mod", tmp_path), config_dirs(spec, "dense-w4g128-mod", tmp_path)
    engine = {s.name: s.settings for s in plan_stages(eng_args, spec, parse_sparsity("2:4"), cfg, dense, cuda=False, bench_backend="ort")}
    assert by["prune 2:4 int4"] == engine["prune"] and by["prune dense int4"] == engine["prune_dense"]
    assert by["prune 2:4 int4"].config.quant_modulation and by["prune 2:4 int4"].out == cfg.prune
    assert _export_fields(by["export 2:4 int4"]) == _export_fields(engine["export_pruned_int4"])


def test_nothing_runnable_is_one_line(tmp_path):
    from benchmarks.pareto import run_pareto

    with pytest.raises(UserError, match="nothing to benchmark: fp8 not benchmarked"):
        run_pareto(_args("--precisions", "fp8", "--artifacts", str(tmp_path)))
    with pytest.raises(UserError, match="unknown sparsity"):
        run_pareto(_args("--grid", "dense,3:4", "--artifacts", str(tmp_path)))
    with pytest.raises(UserError, match="--precisions: unknown"):
        run_pareto(_args("--precisions", "fp32,int2", "--artifacts", str(tmp_path)))
    with pytest.raises(UserError, match="--quant-modulation quantizes the AdaLN modulations to 4 bits in stage 1: it goes with the int4"):
        run_pareto(_args("--precisions", "fp32,int8", "--quant-modulation", "--artifacts", str(tmp_path)))
    with pytest.raises(UserError, match="--memory-axis peak is measured in fresh processes, which --no-memory skips"):
        run_pareto(_args("--memory-axis", "peak", "--no-memory", "--artifacts", str(tmp_path)))
    assert not tmp_path.joinpath("tiny-sd3").exists()


@pytest.mark.slow  # the whole grid end to end (about 3 minutes on 2 cores); the pieces have unit tests above
def test_small_grid_end_to_end_then_reused(tmp_path):
    """dense and structured:0.3, fp32, int8 and int4, on tiny-sd3 with minimal calibration and benchmark settings, each
    variant's memory measured; the rerun finds every stage done."""
    from benchmarks.pareto import run_pareto
    from tests.runtime_fixtures import tiny_sd3

    tiny_sd3()  # skips without the embedded model
    argv = ["--grid", "dense,structured:0.3", "--precisions", "fp32,int8,int4", "--method", "magnitude", "--samples", "2", "--calib-steps", "3",
            "--quant-samples", "1", "--quant-calls", "4", "--runs", "1", "--warmup", "0", "--quality-seeds", "1", "--steps", "3",
            "--artifacts", str(tmp_path)]
    report = run_pareto(_args(*argv))
    out = tmp_path / "tiny-sd3" / "pareto"
    names = {f"{sp} {p}" for sp in ("dense", "structured:0.3") for p in ("fp32", "int8", "int4")}
    assert set(report["variants"]) == names
    for name, v in report["variants"].items():
        assert v["latency_ms"]["median"] > 0 and 0 <= v["quality"]["prompt_accuracy"] <= 1 and v["quality"]["n_images"] == 10
        rows = {r["component"]: r for r in v["memory"]["weights"]["rows"]}
        assert set(rows) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"}
        assert all(r["runtime"] == "onnx" for r in rows.values()) and rows["transformer"]["precision"] == v["precision"]
        assert v["memory"]["generation"]["peak_rss_bytes"] >= v["memory"]["generation"]["loaded_rss_bytes"] > 0
    weights = {n: v["memory"]["weights"]["total"]["disk_bytes"] for n, v in report["variants"].items()}
    assert weights["dense int4"] < weights["dense int8"] < weights["dense fp32"] and weights["structured:0.3 int4"] < weights["dense int4"]
    assert report["variants"]["structured:0.3 int8"]["gemm_flop_ratio"] < 1
    assert report["settings"]["sessions"] == 6 + 3 * 4  # a transformer each; the text encoders and VAE once per precision (linked files)
    assert set(report["fronts"]) == {"prompt_accuracy", "frechet_distance"} and report["fronts"]["prompt_accuracy"]
    for metric, front in report["fronts_latency_quality"].items():  # the three-axis front holds every point of the two-axis one
        assert set(front) <= set(report["fronts"][metric])
    assert report["config_dirs"]["structured:0.3 int8"] == str(tmp_path / "tiny-sd3" / "structured-0.3-magnitude-s2-t3")
    assert report["config_dirs"]["structured:0.3 int4"] == str(tmp_path / "tiny-sd3" / "structured-0.3-magnitude-w4g128-s2-t3")
    assert report["config_dirs"]["dense int4"] == str(tmp_path / "tiny-sd3" / "dense-w4g128-s2-t3")
    saved = json.loads((out / "pareto.json").read_text())
    assert saved["fronts"] == report["fronts"] and (out / "pareto.png").stat().st_size > 0 and "| variant |" in (out / "pareto.md").read_text()
    assert not any(s["reused"] for s in report["stages"])
    again = run_pareto(_args(*argv, "--no-quality", "--no-memory"))
    assert all(s["reused"] for s in again["stages"]) and again["fronts"] == {}
    assert {n: v["memory"]["weights"]["total"]["disk_bytes"] for n, v in again["variants"].items()} == weights
