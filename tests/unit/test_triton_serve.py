"""A real tritonserver serving prompts: equivalence with the in-process runner, bad requests, faults.

One server per module (module-scoped fixture) holds four variants in one repository: tiny-sd3 dense
(``sd3_``), tiny-sd3 2:4 (``sd3_24_``), tiny-flux dense (``flux_``) and a copy of tiny-sd3 dense whose
transformer ONNX was changed after the repository was written (``broken_``). The exports come from the
artifact store (built once by the stage drivers, reused afterwards). The restart test starts its own server.
Images use few steps to keep the module at tens of seconds.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

STEPS = 4
PROMPT = "a handwritten digit 7"
# Served and in-process images run the same ONNX Runtime graphs with the same orchestration; the server's
# sessions run in other processes (and may batch differently), so float32 results can differ in the last bits.
TOLERANCE_UINT8 = 2


def _server_available() -> bool:
    try:
        from runtime.triton_server import server_install, stub_numpy_dir

        server_install()
        stub_numpy_dir()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _server_available(), reason="tritonserver (nvidia-pytriton) and its numpy 1 stub directory need `make setup`")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """The exports the server runs, built here through the artifact store (a quick magnitude 2:4: what is served
    is tested, not the pruning)."""
    from pipeline.serving import prepare_variant

    art = tmp_path_factory.mktemp("artifacts")
    quick = ("--samples", "2", "--calib-steps", "2")
    return {"sd3_": prepare_variant("tiny-sd3", "dense", artifacts=art),
            "sd3_24_": prepare_variant("tiny-sd3", "2:4", method="magnitude", artifacts=art, engine_args=quick),
            "flux_": prepare_variant("tiny-flux", "dense", artifacts=art)}


@pytest.fixture(scope="module")
def server(variants, tmp_path_factory):
    from pipeline.serving import write_repository
    from runtime.triton_server import TritonServer

    repo = tmp_path_factory.mktemp("serve") / "repo"
    write_repository(repo, {**variants, "broken_": variants["sd3_"]}, dynamic_batching=True)
    onnx = repo / "broken_transformer" / "1" / "model.onnx"
    data = bytearray(onnx.read_bytes())  # a hard link to the artifact: replace it, never write through it
    data[-1] ^= 0xFF
    onnx.unlink()
    onnx.write_bytes(bytes(data))
    srv = TritonServer(repo, log_file=repo.parent / "server.log")
    states = srv.start(require_ready=False)
    yield srv, {s.name: s for s in states}
    srv.stop()


def _client(srv):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(srv.grpc_url)


def _in_process(variant, prompt: str, seed: int) -> np.ndarray:
    from families.sampling import sample, to_uint8
    from runtime.pipeline_runner import runner_pipeline

    pipe = runner_pipeline(variant.spec, backend="ort", onnx_dir=variant.onnx_dir, correction=variant.correction)
    return to_uint8(sample(pipe, variant.spec, [prompt], [seed], steps=STEPS))[0]


@pytest.mark.parametrize("prefix", ["sd3_", "sd3_24_", "flux_"])
def test_served_image_equals_in_process_runner(server, variants, prefix):
    from runtime.triton_client import request_image

    srv, _ = server
    served = request_image(srv.grpc_url, PROMPT, model=f"{prefix}pipeline", seed=3, steps=STEPS)
    ref = _in_process(variants[prefix], PROMPT, 3)
    assert served.image.dtype == np.uint8 and served.image.shape == ref.shape
    assert not served.truncated
    diff = np.abs(served.image.astype(int) - ref.astype(int)).max()
    assert diff <= TOLERANCE_UINT8, f"{prefix}: served image differs from the in-process runner by {diff} levels"


def _expect_error(srv, inputs, *words, model="sd3_pipeline"):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        _client(srv).infer(model, inputs)
    msg = e.value.message()
    assert all(w in msg for w in words), msg
    return msg


def test_the_pruned_variant_shares_the_dense_variants_text_encoders_and_vae(variants):
    """The 2:4 export links the dense export's components that the pruning does not change (one export of each
    text encoder and of the VAE per model, not per sparsity); its transformer is its own."""
    import json

    dense, pruned = variants["sd3_"].onnx_dir, variants["sd3_24_"].onnx_dir
    report = json.loads((pruned.parent / "export_report.json").read_text())["components"]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"):
        assert (pruned / f"{name}.onnx").stat().st_ino == (dense / f"{name}.onnx").stat().st_ino, name
        assert report[name]["shared_with"] == str(dense.parent.resolve())
    assert (pruned / "transformer.onnx").stat().st_ino != (dense / "transformer.onnx").stat().st_ino
    assert "shared_with" not in report["transformer"]


def test_bad_requests_get_errors_and_the_next_good_one_is_served(server):
    import tritonclient.grpc as grpcclient

    from runtime.triton_client import pipeline_inputs, request_image

    srv, _ = server
    _expect_error(srv, pipeline_inputs([""]), "prompt is empty")
    wrong = grpcclient.InferInput("prompt", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1), np.float32))
    _expect_error(srv, [wrong], "'prompt'", "expects 'BYTES'")  # Triton names the input and the type it expects
    _expect_error(srv, pipeline_inputs(["x"], steps=1)[1:], "missing required input 'prompt'")
    _expect_error(srv, pipeline_inputs([PROMPT], steps=0), "steps must be between 1 and 100")
    _expect_error(srv, pipeline_inputs([PROMPT], steps=10_000), "steps must be between 1 and 100")
    _expect_error(srv, pipeline_inputs([PROMPT], height=48, width=40), "48x40 is not served")
    _expect_error(srv, pipeline_inputs([PROMPT] * 5, steps=STEPS), "batch")
    good = request_image(srv.grpc_url, PROMPT, model="sd3_pipeline", seed=1, steps=STEPS)
    assert good.image.shape == (32, 32, 3)
    long = request_image(srv.grpc_url, "a handwritten digit 7 " + "x" * 100_000, model="sd3_pipeline", seed=1, steps=STEPS)
    assert long.truncated and long.image.shape == (32, 32, 3)


def test_component_failing_its_manifest_is_unavailable_and_named(server):
    from runtime.triton_client import pipeline_inputs

    srv, states = server
    broken = states["broken_transformer"]
    assert broken.state == "UNAVAILABLE" and "does not match its manifest" in broken.reason
    assert states["sd3_transformer"].state == "READY"
    msg = _expect_error(srv, pipeline_inputs([PROMPT], steps=STEPS), "broken_transformer", model="broken_pipeline")
    assert "sd3_transformer" not in msg
    log = srv.log_path.read_text()
    assert sum("does not match its manifest" in line for line in log.splitlines() if "broken_transformer" in line) >= 1


def test_sigkill_under_load_then_restart_serves_the_same_images(variants, tmp_path):
    from pipeline.serving import write_repository
    from runtime.triton_client import request_image
    from runtime.triton_server import TritonServer, _group_alive

    repo = write_repository(tmp_path / "repo", {"": variants["sd3_"]})
    srv = TritonServer(repo, log_file=tmp_path / "server.log")
    srv.start()
    try:
        before = [request_image(srv.grpc_url, f"a handwritten digit {d}", seed=d, steps=STEPS).image for d in (2, 5)]
        errors = []

        def load():
            for i in range(6):
                try:
                    request_image(srv.grpc_url, PROMPT, seed=i, steps=STEPS, timeout=30)
                except Exception as e:  # noqa: BLE001 - requests in flight when the server dies fail
                    errors.append(e)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        pgid = srv.process.pid
        srv.kill()  # SIGKILL, mid-load
        for t in threads:
            t.join()
        srv.stop()  # the stubs of the killed server go with its process group
        assert not _group_alive(pgid)
        http, grpc = srv.http_port, srv.grpc_port
        srv = TritonServer(repo, http_port=http, grpc_port=grpc, log_file=tmp_path / "server2.log")
        srv.start()
        after = [request_image(srv.grpc_url, f"a handwritten digit {d}", seed=d, steps=STEPS).image for d in (2, 5)]
        for a, b in zip(before, after):  # exact: one computation run twice on this machine (tests/tolerances.py)
            assert np.array_equal(a, b)
    finally:
        srv.stop()
