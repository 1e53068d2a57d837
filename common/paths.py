"""Where the repository is: :data:`REPO_ROOT`, the directory that holds ``models/``, ``prompts/`` and ``artifacts/``."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
