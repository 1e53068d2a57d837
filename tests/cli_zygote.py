"""``python -m <module> <args>`` without paying for the imports each time: a test helper.

A zygote process imports the heavy libraries once (torch, diffusers, onnx, onnxruntime and the project's
command modules), then forks one child per request. The child is a real, separate process: it changes to the
request's directory, takes its environment, writes its standard output and error to files and runs the module
as ``python -m`` would (``runpy.run_module(..., run_name="__main__")``); its exit status is the command's. What
a fresh interpreter would add is only the import time (about 1.5 s of each of the bad-input rows, 3 s for
those that load a model), which the zygote pays once per test worker.

Protocol: one JSON request per line on the zygote's stdin, one JSON reply per line on its stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "safetensors.torch",
           "diffusers.models.transformers",  # the transformer classes: prune's checks build one on the meta device (3 s to import)
           "pipeline.cmd_prune", "pipeline.cmd_export", "pipeline.cmd_build", "pipeline.cmd_generate", "pipeline.cmd_engine")


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


class Zygote:
    """Start with :meth:`start`; :meth:`run` is ``subprocess.run([python, "-m", *argv], cwd=..., env=...)``."""

    def __init__(self, repo: Path):
        self.repo = Path(repo)
        self.proc: subprocess.Popen | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="cli-zygote-")

    def start(self, env: dict[str, str]) -> Zygote:
        self.proc = subprocess.Popen([sys.executable, "-c", "import tests.cli_zygote as z; z.serve()"], cwd=self.repo,
                                     env={**env, "PYTHONPATH": str(self.repo)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"the CLI zygote did not start: {ready!r}")
        return self

    def run(self, argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> Completed:
        out, err = Path(self.tmp.name) / "stdout", Path(self.tmp.name) / "stderr"
        req = {"module": argv[0], "args": argv[1:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline() or '{"status": -1}')
        return Completed(reply["status"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.tmp.cleanup()


def serve() -> None:
    """The zygote's loop (run in the zygote process)."""
    import importlib
    import signal

    for name in PRELOAD:
        importlib.import_module(name)
    proto_in, proto_out = sys.stdin, sys.stdout
    print(json.dumps({"ready": True}), file=proto_out, flush=True)
    for line in proto_in:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)  # never returns
        deadline = req["timeout"]
        signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
        signal.alarm(int(deadline))
        _, status = os.waitpid(pid, 0)
        signal.alarm(0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=proto_out, flush=True)


def _child(req: dict) -> None:
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()  # its own process group, as a command started from a shell
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
        os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = [req["module"], *req["args"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
