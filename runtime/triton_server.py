"""Start, watch and stop a real ``tritonserver`` (the one the ``nvidia-pytriton`` wheel bundles) on a model repository.

:class:`TritonServer` prepares what the bundled server needs to run the Python backend outside NVIDIA's
container, starts it in its own process group bound to ``127.0.0.1`` (model control mode ``none``), waits until
every model of the repository is ready or has failed, and stops the whole group (the server and its Python
backend stubs) on :meth:`~TritonServer.stop`, at interpreter exit, and on SIGTERM/SIGINT of the parent.

What the bundled server needs (found by trying it): the ``triton_python_backend_stub`` built for the running
Python version copied next to ``libtriton_python.so`` in the directory passed as ``--backend-directory``;
``LD_LIBRARY_PATH`` starting with this interpreter's own ``libpython`` directory (else the stub loads an older
system libpython and ``_ssl`` fails with ``undefined symbol``), then the wheel's ``nvidia_pytriton.libs``; this
environment first on ``PATH`` (the stub takes its ``sys.path`` from it; it ignores ``PYTHONPATH``), one whose
``sys.path`` starts with numpy 1.x (see :func:`stub_numpy_dir`), then the project's environment and repository.

Readiness and failures come from Triton's own HTTP API (``/v2/health/live``, ``/v2/repository/index``): a
model that failed to load is reported with Triton's reason, and the server keeps serving the others
(``--exit-on-error=false``).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.paths import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
_LIVE_SERVERS: set["TritonServer"] = set()


def server_install() -> tuple[Path, Path]:
    """``(pytriton/tritonserver directory, nvidia_pytriton.libs directory)`` of the installed wheel."""
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("tritonserver is not installed: run `make setup` (it installs the serve extra and nvidia-pytriton)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    server_dir, libs = pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise UserError(f"{server_dir}/bin/tritonserver is missing: reinstall nvidia-pytriton (`make setup`)")
    return server_dir, libs


def prepare_backends(dest: Path) -> Path:
    """A ``--backend-directory`` under ``dest`` holding the Python backend with the stub for this Python."""
    server_dir, _ = server_install()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (server_dir / "python_backend_stubs").iterdir())
        raise UserError(f"the bundled tritonserver has no Python backend stub for Python {version} (it has {', '.join(have)})")
    backends = dest / "backends"
    shutil.copytree(server_dir / "backends", backends, dirs_exist_ok=True)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def stub_numpy_dir() -> Path:
    """Where ``make setup`` puts numpy 1.x for the Python backend stubs (``<venv>/serve-numpy1``).

    The bundled stub (pybind11 against the numpy 1 C API) reads numpy 2 arrays wrongly: ``as_numpy()`` of an
    FP32 input returns zeros, of a BYTES input crashes the stub, and ``pb_utils.Tensor(name, array)`` sends a
    wrong size. The project's environment keeps numpy 2; only the stubs import numpy 1.26 from this directory
    (torch, ONNX Runtime and scipy wheels built against numpy 2 run on numpy >= 1.26).
    """
    d = Path(sys.prefix) / "serve-numpy1"
    if not (d / "numpy").is_dir():
        raise UserError(f"{d} is missing: run `make setup` (it installs numpy 1.x there for the Triton Python backend stubs)")
    return d


def stub_environment(dest: Path) -> Path:
    """A virtual environment under ``dest`` for the Python backend stubs; returns its ``bin``.

    The stub ignores ``PYTHONPATH`` and takes its ``sys.path`` from the ``python3`` first on ``PATH``. This
    environment's ``site-packages`` holds one ``.pth`` that adds, in order, numpy 1.x (:func:`stub_numpy_dir`),
    the project's environment (with its editable install of this repository) and the repository root.
    """
    env_dir = dest / "stub-env"
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    site = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    ours = [str(stub_numpy_dir()), *dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]), str(REPO_ROOT)]
    (site / "_sparse_dit_deploy_serve.pth").write_text("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in ours) + "\n")
    return env_dir / "bin"


def server_env(libs: Path, stub_bin: Path) -> dict[str, str]:
    """The environment the server and its Python stubs run in (see the module doc)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(stub_bin), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ModelState:
    """One model of the repository as Triton's repository index reports it."""

    name: str
    state: str  # READY, UNAVAILABLE, LOADING...
    reason: str = ""


@dataclass
class TritonServer:
    """A ``tritonserver`` process on ``repository``; use as a context manager or call :meth:`start`/:meth:`stop`.

    host: address the HTTP and gRPC endpoints bind to (``127.0.0.1``; ``0.0.0.0`` exposes them). Ports: 0
    picks free ones. log_file: the server's stdout/stderr (default: ``<work dir>/server.log``, a temporary
    directory removed on stop unless ``log_file`` is given).
    """

    repository: Path
    host: str = DEFAULT_HOST
    http_port: int = 0
    grpc_port: int = 0
    log_file: Path | None = None
    log_verbose: int = 0
    process: subprocess.Popen | None = field(default=None, init=False)
    _work: Path | None = field(default=None, init=False)

    def __hash__(self) -> int:
        return id(self)

    @property
    def grpc_url(self) -> str:
        return f"{self.host if self.host != '0.0.0.0' else DEFAULT_HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host if self.host != '0.0.0.0' else DEFAULT_HOST}:{self.http_port}"

    def start(self, *, timeout: float = 300.0, require_ready: bool = True) -> list[ModelState]:
        """Start the server and wait for every model to be ready or failed (``timeout`` seconds).

        Returns the repository index. ``require_ready``: a model that failed to load is a :class:`UserError`
        naming it and Triton's reason (the server is stopped); otherwise it is logged and the server keeps running.
        """
        repo = Path(self.repository)
        if not repo.is_dir():
            raise UserError(f"model repository {repo} does not exist; run `python -m pipeline serve` to write it")
        server_dir, libs = server_install()
        self._work = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        backends = prepare_backends(self._work)
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        log_path = Path(self.log_file) if self.log_file else self._work / "server.log"
        cmd = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={repo.resolve()}",
            f"--backend-directory={backends}",
            "--model-control-mode=none",
            "--exit-on-error=false",
            "--strict-readiness=false",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--exit-timeout-secs=5",  # stop(): in-flight requests get 5 s, then SIGKILL after stop()'s own timeout
            "--allow-metrics=false",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--log-verbose={int(self.log_verbose)}",
        ]
        self._log = open(log_path, "ab")
        log.info("starting tritonserver on %s (HTTP %s, gRPC %s), log %s", repo, self.http_port, self.grpc_port, log_path)
        # Own session and process group: the stubs the server forks are in it, so stop() ends them all.
        self.process = subprocess.Popen(cmd, env=server_env(libs, stub_environment(self._work)), cwd=self._work, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log_path
        _LIVE_SERVERS.add(self)
        _install_handlers()
        try:
            states = self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        failed = [s for s in states if s.state != "READY"]
        for s in failed:
            log.error("model %s is unavailable: %s", s.name, s.reason or s.state)
        if failed and require_ready:
            self.stop()
            raise UserError("; ".join(f"model {s.name} is unavailable: {s.reason or s.state}" for s in failed))
        return states

    def _get(self, path: str, data: bytes | None = None, timeout: float = 5.0):
        req = urllib.request.Request(self.http_url + path, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return r.status, (json.loads(body) if body else None)

    def repository_index(self) -> list[ModelState]:
        """Every model of the repository with its state and Triton's reason for a failure."""
        _, index = self._get("/v2/repository/index", data=b"{}")
        return [ModelState(m["name"], m.get("state", ""), m.get("reason", "")) for m in index or []]

    def wait_ready(self, timeout: float = 300.0) -> list[ModelState]:
        """Wait until the server is live and no model is still loading; returns the repository index."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                tail = self.log_tail()
                raise UserError(f"tritonserver exited with status {self.process.returncode if self.process else '?'} before it was ready: {tail}")
            try:
                status, _ = self._get("/v2/health/live", timeout=2.0)
                if status == 200:
                    states = self.repository_index()
                    if states and all(s.state in ("READY", "UNAVAILABLE") for s in states):
                        return states
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise UserError(f"tritonserver was not ready within {timeout:.0f} s; its log: {self.log_path}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL the server process only (its stubs notice their parent is gone); for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and every process of its group (SIGTERM, then SIGKILL after ``timeout`` s)."""
        proc, self.process = self.process, None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", timeout)
            # the group outlives a killed leader (stubs): wait for it to empty, then kill what is left
            deadline = time.monotonic() + timeout
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait()
            deadline = time.monotonic() + 5.0
            while _group_alive(proc.pid) and time.monotonic() < deadline:  # SIGKILL is not instantaneous
                time.sleep(0.1)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._work is not None:
            if self.log_file is None and self.log_path.is_file():
                log.debug("server log:\n%s", self.log_path.read_text(errors="replace")[-4000:])
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        _LIVE_SERVERS.discard(self)

    def detach(self) -> dict:
        """Leave the running server to outlive this process (no stop at exit); returns what :func:`stop_detached`
        needs: its process group, endpoints, work directory and log."""
        if self.process is None:
            raise UserError("the server is not running")
        _LIVE_SERVERS.discard(self)
        state = {"pid": self.process.pid, "grpc": self.grpc_url, "http": self.http_url, "repository": str(self.repository),
                 "work_dir": str(self._work), "log": str(self.log_path)}
        self.process = None
        self._work = None
        return state

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count: in a container without an init
    that reaps them, the killed server's stubs stay zombies and ``killpg(pgid, 0)`` would still succeed)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_detached(state: dict, timeout: float = 20.0) -> bool:
    """Stop a server left running by :meth:`TritonServer.detach` (its whole process group); False if it was gone."""
    pid = int(state["pid"])
    alive = _group_alive(pid)
    if alive:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if state.get("work_dir"):
        shutil.rmtree(state["work_dir"], ignore_errors=True)
    return alive


def stop_all() -> None:
    """Stop every server this process started (atexit and signal handlers call it)."""
    for s in list(_LIVE_SERVERS):
        s.stop(timeout=10.0)


_HANDLERS_INSTALLED = False


def _install_handlers() -> None:
    """atexit, SIGTERM and SIGHUP stop our servers (Ctrl-C raises KeyboardInterrupt, which unwinds to atexit)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_all)
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            stop_all()
            if callable(previous):
                previous(signum, frame)
            else:
                raise SystemExit(128 + signum)

        signal.signal(sig, handler)
