"""A non-editable install: the wheel holds every package of the repository, each module imports from it, and
the CLI runs from it (``python -m pipeline --help`` and the ``sparse-dit`` console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOT_SHIPPED = {"tests", "scripts"}  # the test suite; training and fixture scripts run from a checkout


def repo_packages() -> set[str]:
    return {p.parent.name for p in REPO.glob("*/__init__.py")} - NOT_SHIPPED


def test_wheel_installs_every_package_and_the_cli_runs(tmp_path):
    src = tmp_path / "src"
    for name in repo_packages():
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if "/" in n and not n.split("/")[0].endswith(".dist-info")}
    assert top == repo_packages(), f"the wheel's packages {sorted(top)} are not the repository's {sorted(repo_packages())}"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    # every module of every package, imported from the install (not the checkout: cwd is elsewhere)
    code = (
        "import importlib, pkgutil, sys\n"
        f"site = {str(site)!r}\n"
        f"for name in {sorted(repo_packages())!r}:\n"
        "    pkg = importlib.import_module(name)\n"
        "    assert pkg.__file__.startswith(site), (name, pkg.__file__)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, name + '.'):\n"
        "        if not m.name.endswith('__main__') and '.triton_models.' not in m.name:  # those run inside Triton\n"
        "            importlib.import_module(m.name)\n"
        "print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]
    for argv in ([sys.executable, "-m", "pipeline", "--help"], [str(site / "bin" / "sparse-dit"), "--help"]):
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "engine" in out.stdout and "prune" in out.stdout, out.stderr[-3000:]
