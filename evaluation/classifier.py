"""The digit classifier behind the quality metrics: a small CNN on 32x32 grayscale digits.

Stored as ``models/digit-classifier/model.safetensors`` + ``config.json`` (no pickles); trained by
``scripts/train_digit_classifier.py`` on the ``classifier`` split only, so neither the generator's training
digits nor the held-out reference digits are seen. Its 64-wide penultimate layer gives the features of the
Fréchet distance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from common.errors import UserError
from common.paths import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / "models" / "digit-classifier"


class DigitClassifier(nn.Module):
    """(N, 1, 32, 32) in [0, 1] -> logits (N, 10); :meth:`features` -> (N, feature_dim)."""

    def __init__(self, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, w, 16, 16)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 8, 8)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def save(self, directory: str | Path, metrics: dict) -> None:
        from safetensors.torch import save_file

        from common.io import atomic_path

        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "model.safetensors")
            (tmp / "config.json").write_text(
                json.dumps({"width": self.width, "feature_dim": self.feature_dim, "metrics": metrics}, indent=2) + "\n"
            )


def load_classifier(directory: str | Path = DEFAULT_DIR) -> DigitClassifier:
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_file, weights = directory / "config.json", directory / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(f"digit classifier missing in {directory}; run `python scripts/train_digit_classifier.py`")
    cfg = json.loads(cfg_file.read_text())
    model = DigitClassifier(cfg["width"], cfg["feature_dim"])
    model.load_state_dict(load_file(weights))
    return model.eval()
