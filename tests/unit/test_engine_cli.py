"""``python -m pipeline engine`` (make engine): bad input, and (opt-in) a full run that is reused on rerun."""

import json
import subprocess
import sys

import pytest


def _engine(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "engine", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, start",
    [
        (["--sparsity", "3:4"], "error: unknown sparsity pattern '3:4'"),
        (["--sparsity", "dense"], "error: SPARSITY=dense has nothing to prune"),
        (["--model", "sd9"], "error: unknown model 'sd9'"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, start):
    r = _engine("--artifacts", str(tmp_path), *args)
    assert r.returncode == 2
    assert r.stderr.startswith(start) and r.stderr.strip().count("\n") == 0
    assert not any(tmp_path.iterdir())  # nothing written


def test_only_bench_needs_finished_stages(tmp_path):
    r = _engine("--artifacts", str(tmp_path), "--only-bench")
    assert r.returncode == 2 and "is not complete; run `make engine" in r.stderr


@pytest.mark.slow
def test_engine_runs_end_to_end_and_reuses_stages(tmp_path):
    args = ["--artifacts", str(tmp_path), "--sparsity", "structured:0.3", "--samples", "2", "--calib-steps", "4",
            "--runs", "1", "--warmup", "0", "--threads", "1"]
    first = _engine(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "tiny-sd3" / "structured-0.3-obs-diff"
    assert first.stdout.strip().splitlines()[-1] == str(root)
    bench = json.loads((root / "bench.json").read_text())
    for variant in ("dense", "pruned"):
        assert {"median", "p90"} <= set(bench[variant]["latency_ms"]) and bench[variant]["backend"]
    assert bench["speedup"] > 0
    second = _engine(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    stages = json.loads((root / "manifest.json").read_text())["stages"]
    assert all(stages[s]["reused"] for s in stages if s != "bench"), stages


# -- the stage plan: typed settings, checked before the first stage ----------------------------------------
def _plan(tmp_path, *argv, cuda=False, backend="ort"):
    from families.registry import resolve_model
    from obsdiff.patterns import parse_sparsity
    from pipeline import engine
    from pipeline.artifacts import config_dirs

    args = engine.parse_args(["--artifacts", str(tmp_path / "art"), *argv])
    spec, sparsity = resolve_model(args.model), parse_sparsity(args.sparsity)
    cfg = config_dirs(spec, f"{sparsity.id}-{args.method}", tmp_path / "art")
    dense = config_dirs(spec, "dense", tmp_path / "art")
    return args, cfg, dense, engine.plan_stages(args, spec, sparsity, cfg, dense, cuda=cuda, bench_backend=backend)


def _command_settings(name: str, argv: list[str]):
    """What ``python -m pipeline <name> argv`` would run, as its own command builds the settings."""
    import importlib

    from common.cli import ArgumentParser

    module = importlib.import_module(f"pipeline.cmd_{name}")
    parser = ArgumentParser(prog="test")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return module.settings_from_args(parser.parse_args([name, *argv]))


def test_engine_stage_settings_equal_the_stage_commands(tmp_path):
    """The settings `make engine` builds are exactly those of the stage commands with the same options, so a
    stage output made by a command (or by an earlier `make engine`) is reused."""
    from export.stage import ExportSettings
    from obsdiff.stage import PruneSettings
    from runtime.stage import BuildSettings

    args, cfg, dense, stages = _plan(tmp_path, "--samples", "2", "--calib-steps", "4", "--opt-level", "1", "--triton", str(tmp_path / "tr"))
    assert [s.name for s in stages] == ["prune", "export_dense", "export_dense_fp16", "engines_dense", "export_pruned",
                                        "export_pruned_fp16", "engines_pruned"]
    by_name = {s.name: s for s in stages}
    assert isinstance(by_name["prune"].settings, PruneSettings) and by_name["prune"].marker == cfg.prune / "plan.json"
    assert by_name["prune"].settings == _command_settings(
        "prune", ["--model", "tiny-sd3", "--sparsity", "2:4", "--method", "obs-diff", "--groups", "4", "--out", str(cfg.prune),
                  "--samples", "2", "--steps", "4"])
    for which, dirs, extra in (("dense", dense, []), ("pruned", cfg, ["--pruned", str(cfg.prune)])):
        fp32, fp16, eng = by_name[f"export_{which}"], by_name[f"export_{which}_fp16"], by_name[f"engines_{which}"]
        assert isinstance(fp32.settings, ExportSettings) and isinstance(eng.settings, BuildSettings)
        share = (lambda d: ["--share-from", str(d)]) if extra else (lambda d: [])  # noqa: E731  the pruned exports link the dense ones' other components
        assert fp32.settings == _command_settings("export", ["--model", "tiny-sd3", "--out", str(dirs.export), "--precision", "fp32", *extra,
                                                             *share(dense.export)])
        assert fp16.settings == _command_settings("export", ["--model", "tiny-sd3", "--out", str(dirs.export_fp16), "--precision", "fp16",
                                                             "--components", "transformer", "--parity-batches", "2", *extra,
                                                             *share(dense.export_fp16)])
        build = ["--model", "tiny-sd3", "--onnx-dir", str(dirs.export_fp16 / "onnx"), "--out", str(dirs.engines),
                 "--sparsity", "2:4" if extra else "dense", "--opt-level", "1"]
        assert eng.settings == _command_settings("build", build + (["--triton", str(tmp_path / "tr")] if extra else []))
    assert stages[1].settings.to_json()["components"] == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"]
    assert not (tmp_path / "art").exists() and not (tmp_path / "tr").exists()  # planning and checking create nothing


def test_gpu_plan_exports_every_component_in_fp16_and_no_fp32(tmp_path):
    _, _, _, stages = _plan(tmp_path, cuda=True, backend="trt")
    assert [s.name for s in stages] == ["prune", "export_dense_fp16", "engines_dense", "export_pruned_fp16", "engines_pruned"]
    assert stages[1].settings.components is None and stages[1].settings.precision == "fp16"  # None: every component


def test_a_bad_value_in_the_last_stage_stops_before_the_first(tmp_path, monkeypatch):
    from common.errors import UserError
    from pipeline import engine

    ran = []
    monkeypatch.setattr(engine, "run_stage", lambda st: ran.append(st.name))
    monkeypatch.setattr(engine, "run_bench", lambda b: ran.append("bench"))
    (tmp_path / "afile").write_text("not a directory")
    args = engine.parse_args(["--artifacts", str(tmp_path / "art"), "--triton", str(tmp_path / "afile")])
    with pytest.raises(UserError, match="--triton: .*not a directory"):
        engine.run_engine(args)
    assert ran == [] and not (tmp_path / "art").exists()


def _fake_result():
    lat = {"median": 10.0, "p90": 11.0}
    return {"dense": {"backend": "fake", "latency_ms": lat}, "pruned": {"backend": "fake", "latency_ms": lat}, "speedup": 1.0,
            "speedup_transformer": 1.0}


def test_engine_calls_the_stage_drivers_in_order_and_records_reuse(tmp_path, monkeypatch, capsys):
    """The orchestration alone (stage checks and drivers replaced): every check before the first run, order,
    markers, manifest settings, reuse on rerun, summary."""
    from pipeline import engine

    calls = []

    def fake_stage(st):
        calls.append(("run", st.name))
        if not st.marker.exists():  # a driver writes its marker last, and leaves a current output alone
            from common.io import make_dirs

            make_dirs(st.marker.parent)  # as a driver's created_dirs does: directories marked as the project's
            st.marker.write_text("{}")

    monkeypatch.setattr(engine, "check_stage", lambda st: calls.append(("check", st.name)))
    monkeypatch.setattr(engine, "run_stage", fake_stage)
    monkeypatch.setattr(engine, "run_bench", lambda b: calls.append(("run", "bench")) or _fake_result())
    args = engine.parse_args(["--artifacts", str(tmp_path / "art"), "--no-engines", "--backend", "ort", "--samples", "2"])
    names = ["prune", "export_dense", "export_pruned"]
    for rerun in (False, True):
        calls.clear()
        assert engine.run_engine(args) == 0
        assert calls == [("check", n) for n in names] + [("run", n) for n in [*names, "bench"]]
        root = tmp_path / "art" / "tiny-sd3" / "2-4-obs-diff"
        assert capsys.readouterr().out.strip().splitlines()[-1] == str(root)
        stages = json.loads((root / "manifest.json").read_text())["stages"]
        assert [stages[s]["reused"] for s in names] == [rerun] * 3 and not stages["bench"]["reused"]
        assert stages["prune"]["settings"]["calibration"]["samples"] == 2 and stages["export_pruned"]["settings"]["precision"] == "fp32"
        assert stages["bench"]["settings"]["backend"] == "ort"


# -- the benchmark's image grid -----------------------------------------------------------------------------
def test_bench_grid_shows_every_prompt(tmp_path, monkeypatch):
    """tiny-sd3's grid has all ten digits (it used to stop at 7), one column each, in order; more prompts than
    fit in a band wrap into further bands instead of being dropped."""
    import numpy as np
    from PIL import Image

    import runtime.pipeline_runner as runner
    from measure import e2e
    from measure.report import GRID_MAX_COLS
    from families.registry import resolve_model

    spec = resolve_model("tiny-sd3")
    shade = lambda prompt: (int(prompt.split()[-1]) * 25 + 10) if prompt.split()[-1].isdigit() else 255  # noqa: E731
    monkeypatch.setattr(runner, "generate", lambda pipe, spec, prompt, **kw: [np.full((8, 8, 3), shade(prompt), np.uint8)])
    prompts = e2e.grid_prompts_for(spec)
    assert prompts == [f"a handwritten digit {d}" for d in range(10)]
    assert e2e.grid_prompts_for(spec, ["a handwritten digit 4"]) == ["a handwritten digit 4"]
    path = e2e.write_grid({"dense": None, "pruned": None, "eager": None}, spec, prompts, tmp_path / "grid.png", seed=0, steps=2)
    grid = np.asarray(Image.open(path).convert("RGB"))
    cell, label_w, head_h = 96, 70, 14
    assert grid.shape[:2] == (head_h + 3 * cell, label_w + 10 * cell)
    for row in range(3):
        y = head_h + row * cell + cell // 2
        assert [int(grid[y, label_w + d * cell + cell // 2, 0]) for d in range(10)] == [d * 25 + 10 for d in range(10)]

    many = [f"a handwritten digit {d % 10}" for d in range(2 * GRID_MAX_COLS + 4)]  # 24 prompts: three bands
    grid = np.asarray(Image.open(e2e.write_grid({"dense": None, "pruned": None}, spec, many, tmp_path / "many.png")).convert("RGB"))
    band_h = head_h + 2 * cell
    assert grid.shape[:2] == (3 * band_h, label_w + GRID_MAX_COLS * cell)
    last = len(many) - 1
    band, col = divmod(last, GRID_MAX_COLS)
    assert int(grid[band * band_h + head_h + cell + cell // 2, label_w + col * cell + cell // 2, 0]) == shade(many[last])


def test_build_takes_the_exports_sparsity_unless_told(tmp_path):
    """``build --sparsity`` defaults to the pattern the export's report records (dense without a report)."""
    import argparse

    from pipeline import cmd_build

    parser = argparse.ArgumentParser()
    cmd_build.add_parser(parser.add_subparsers())
    onnx = tmp_path / "export" / "onnx"
    onnx.mkdir(parents=True)
    parse = lambda *extra: cmd_build.settings_from_args(parser.parse_args(["build", "--onnx-dir", str(onnx), *extra]))  # noqa: E731
    assert str(parse().sparsity) == "dense"
    (onnx.parent / "export_report.json").write_text(json.dumps({"sparsity": "2:4"}))
    assert str(parse().sparsity) == "2:4"
    assert str(parse("--sparsity", "4:8").sparsity) == "4:8"  # told: check_export_for then refuses the mismatch in one line


def test_int4_plan_exports_matmul_nbits_for_onnx_runtime_and_w4a16_for_the_engines(tmp_path):
    """``--precision int4``: ONNX Runtime's MatMulNBits export and, unless --no-engines, the same 4-bit weights as TensorRT's
    INT4 DequantizeLinear (export-w4a16/) built into engines-w4a16/, on both sides (the dense side prunes nothing, 4-bit)."""
    _, cfg, dense, stages = _plan(tmp_path, "--precision", "int4")
    assert [s.name for s in stages] == ["prune", "prune_dense", "export_dense_int4", "export_dense_w4a16", "engines_dense_w4a16",
                                        "export_pruned_int4", "export_pruned_w4a16", "engines_pruned_w4a16"]
    by_name = {s.name: s for s in stages}
    w4 = by_name["export_pruned_w4a16"].settings
    assert w4.precision == "w4a16" and w4.out == cfg.export_for("w4a16") and w4.other_precision == "fp16" and w4.components == ("transformer",)
    assert by_name["engines_pruned_w4a16"].settings.onnx_dir == cfg.export_for("w4a16") / "onnx"
    assert by_name["engines_dense_w4a16"].settings.out == dense.engines_for("w4a16")
    _, _, _, stages = _plan(tmp_path, "--precision", "int4", "--no-engines")
    assert [s.name for s in stages] == ["prune", "prune_dense", "export_dense_int4", "export_pruned_int4"]
