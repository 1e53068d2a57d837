"""``python -m pipeline serve`` (``make serve``): serve a model at a sparsity with Triton, prompt in, image out.

Builds what is missing through the artifact store (:func:`pipeline.serving.prepare_variant`), writes the
serving repository to ``artifacts/<model>/<config-id>/triton-serve/``, starts the bundled ``tritonserver`` on it
bound to 127.0.0.1, waits until every model is ready and prints the endpoints. It stays in the foreground
until Ctrl-C (or SIGTERM), which stops the server and its backend processes; ``--detach`` leaves it running
and records it in ``artifacts/serve.json``, and ``python -m pipeline serve --stop`` stops it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from common.cli import int_at_least, int_range
from common.errors import UserError

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve prompts -> images with Triton (make serve)", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd3", help="registry id or local diffusers directory (default tiny-sd3)")
    p.add_argument("--sparsity", default="2:4", help="dense, 2:4, 4:8, unstructured:<r>, structured:<r> (default 2:4)")
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude"])
    p.add_argument("--repository", default=None, help="where to write the model repository (default <config dir>/triton-serve)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--http-port", type=int_range(1, 65535), default=8000)
    p.add_argument("--grpc-port", type=int_range(1, 65535), default=8001)
    p.add_argument("--dynamic-batching", action="store_true", help="let Triton batch concurrent requests (pipeline and component models)")
    p.add_argument("--instances", type=int_at_least(1), default=1, help="instances of the pipeline model (default 1)")
    p.add_argument("--max-steps", type=int_at_least(1), default=None, help="largest `steps` a request may ask for (default 100)")
    p.add_argument("--artifacts", default=None, help="artifact root (default <repo>/artifacts)")
    p.add_argument("--detach", action="store_true", help="leave the server running in the background (stop it with --stop)")
    p.add_argument("--stop", action="store_true", help="stop the server a --detach run left running")
    p.set_defaults(func=run)


def _state_file(args) -> Path:
    from pipeline.artifacts import ARTIFACTS

    return (Path(args.artifacts) if args.artifacts else ARTIFACTS) / "serve.json"


def run(args: argparse.Namespace) -> int:
    from common.io import read_json, write_json
    from runtime.triton_server import TritonServer, stop_detached

    state_file = _state_file(args)
    if args.stop:
        if not state_file.is_file():
            raise UserError(f"no detached server is recorded in {state_file}; a foreground `make serve` stops with Ctrl-C")
        state = read_json(state_file)
        gone = not stop_detached(state)
        state_file.unlink()
        print(f"server at {state['grpc']} was already gone" if gone else f"stopped the server at {state['grpc']}")
        return 0
    if state_file.is_file():
        raise UserError(f"a detached server is recorded in {state_file} ({read_json(state_file).get('grpc')}); "
                        f"stop it first with `python -m pipeline serve --stop`")
    from pipeline.serving import prepare_variant, write_repository

    if args.repository:  # before the stages run: a repository that cannot be written is found now
        from common.io import check_output

        check_output(args.repository, "parent", option="--repository")
    variant = prepare_variant(args.model, args.sparsity, method=args.method, artifacts=args.artifacts, max_steps=args.max_steps)
    repo = Path(args.repository) if args.repository else variant.config_dir / "triton-serve"
    write_repository(repo, {"": variant}, dynamic_batching=args.dynamic_batching, instances=args.instances)
    server = TritonServer(repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, log_file=repo.parent / "triton-serve.log")
    server.start()
    shapes = ", ".join(f"{h}x{w}" for h, w in variant.limits.resolutions)
    print(f"serving {variant.spec.id} {variant.label} ({shapes} px, steps <= {variant.limits.max_steps}) from {repo}", flush=True)
    print(f"log: {server.log_path}", flush=True)
    if args.detach:
        write_json(state_file, server.detach())
        print("detached; stop it with `python -m pipeline serve --stop` (make serve-stop)", flush=True)
        print(f"grpc: {server.grpc_url}", flush=True)
        return 0
    print(f"grpc: {server.grpc_url}  http: {server.http_url}  (Ctrl-C stops the server)", flush=True)
    try:
        # poll, not wait(): a signal handler that stops the server must not find the child's wait lock taken
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        if server.process is not None:
            raise UserError(f"tritonserver exited with status {server.process.returncode}: {server.log_tail()}")
    finally:
        server.stop()
    return 0
