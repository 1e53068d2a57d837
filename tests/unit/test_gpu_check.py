"""``make gpu-check DRY_RUN=1``: the GPU check's program on the CPU with tiny configs of SD3-medium and Flux.1-dev
(the same code path up to the kernels), its JSON and Markdown, and its one-line refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_the_report(tmp_path, capsys):
    pytest.importorskip("torchao", reason="needs torchao (`make setup` installs it: the torch-gpu extra)")
    out = tmp_path / "check"
    status = gpu_check.main(["--out", str(out), "--dry-run", "--rounds", "1", "--tests", "tests/gpu/test_torch_backend_gpu.py"])
    assert status == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] and data["environment"]["gpu"] is None
    tests = data["tests"]
    assert tests["skipped"] and not tests["failed"] and all("CUDA" in s["reason"] for s in tests["skipped"])
    assert set(data["models"]) == {"sd3-medium", "flux.1-dev"}
    for model_id, entry in data["models"].items():
        variants = entry["variants"]
        assert list(variants) == list(gpu_check.variants_for(model_id)), model_id
        for name, v in variants.items():
            assert "error" not in v, (model_id, name, v)
            # INT4 converts on the CPU too (PyTorch's CPU tinygemm kernel runs the same format); the rest need CUDA
            assert v["eager"]["runs"] == 1 and v["converted"] is (name == gpu_check.INT4)
        assert variants["2:4 bf16"]["sparse_layers"] > 0 and variants["2:4 bf16"]["kernel"] in ("cusparselt", "cutlass")
        assert variants["fp8 + 2:4"]["kernel"] == "torchao-cutlass-sm90a-f8f8"
        assert variants["int8"]["quantized_layers"] > 0 and variants["dense bf16"]["sparse_layers"] == 0
        assert set(entry["not_compiled"].values()) == {"dry run"}
        assert "int8 + 2:4" in entry["unavailable"]
    assert data["models"]["flux.1-dev"]["flux_28_steps_s"]["dense bf16 (eager)"] > 0
    int4 = data["models"]["sd3-medium"]["variants"][gpu_check.INT4]
    assert gpu_check.INT4 not in data["models"]["flux.1-dev"]["variants"]
    # the tiny config's K=256 feed-forward outputs are the linears a 128-group fits; each checked against its dequantized weight
    assert int4["quantized_layers"] == int4["int4"]["int4_layers"] > 0 and int4["int4"]["layer_check"]["ok"]
    assert "_for_cpu" in int4["int4"]["kernel"] and any("CUDA kernel" in n for n in int4["notes"])
    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| fp8 + 2:4 |" in md and "diffusers-torchao" in md and "INT4 weight-only (int4 wo)" in md
    assert capsys.readouterr().out.strip().endswith("gpu_check.md")


def test_without_a_gpu_and_without_dry_run_it_refuses_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "c"), "--no-tests"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA GPU visible") and "DRY_RUN=1" in err[0]


def test_unknown_model_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "c"), "--dry-run", "--models", "tiny-sd3", "--no-tests"]) == 2
    assert "unknown published config 'tiny-sd3'" in capsys.readouterr().err


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_sparse_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x128x64_cusparselt", "sparse-gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_sparse_bf16_128x128_64x3_tn_align8>", "sparse-gemm"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64>>", "other"),
    ("triton_poi_fused_add_mul_0", "other"),
])
def test_kernel_names_are_classified(name, kind):
    assert gpu_check.kernel_kind(name) == kind


def test_make_target_runs_the_program():
    dry = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "DRY_RUN=1", "OUT=/tmp/x"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "-m benchmarks.gpu_check --out \"/tmp/x\" --wheels \".whl/gpu\" --dry-run" in dry
    gpu = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "OUT=o", "WHEELS=w"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert gpu.strip().splitlines()[-1].startswith("python3 -m benchmarks.gpu_check --out \"o\" --wheels \"w\"")


def test_a_run_cut_at_the_hard_limit_keeps_what_it_measured(tmp_path):
    out = tmp_path / "cut"
    assert gpu_check.main(["--out", str(out), "--dry-run", "--no-tests", "--models", "sd3-medium", "--rounds", "100000",
                           "--budget-s", "600", "--hard-limit-s", "10"]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert any(n.startswith("stopped at the hard limit (10 s)") for n in data["notes"])
    assert data["models"]["sd3-medium"]["variants"]["dense bf16"]["weights_gib"] is not None  # measured before the cut
    assert data["elapsed_s"] < 60
