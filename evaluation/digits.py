"""scikit-learn's bundled handwritten digits (offline), split once, shared by training and evaluation.

Splits (fixed permutation, seed 0): ``generator`` (60%, trains tiny-sd3), ``classifier`` (25%, trains the
evaluation classifier), ``heldout`` (15%, real reference digits: classifier accuracy and the Fréchet
reference). Images are 8x8 in [0, 16]; :func:`to_pixels` upsamples them to the model's 32x32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SPLITS = {"generator": (0.0, 0.60), "classifier": (0.60, 0.85), "heldout": (0.85, 1.0)}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Phrasings the model is trained on; "{d}" is the numeral, "{w}" the word.
TEMPLATES = [
    "a handwritten digit {d}",
    "the number {d}",
    "a handwritten {w}",
    "digit {d}, handwritten",
    "a drawing of the digit {w}",
]
EVAL_TEMPLATE = TEMPLATES[0]


def prompt_for(digit: int, template: str = EVAL_TEMPLATE) -> str:
    return template.format(d=digit, w=WORDS[digit])


def all_prompts() -> list[str]:
    """Every training phrasing of every digit (the tiny-sd3 calibration prompts)."""
    return [prompt_for(d, t) for t in TEMPLATES for d in range(10)]


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of a split: images (N, 8, 8) float in [0, 1], labels (N,) int64."""
    from sklearn.datasets import load_digits

    if name not in SPLITS:
        raise KeyError(f"unknown split {name!r}; splits: {list(SPLITS)}")
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    lo, hi = SPLITS[name]
    idx = order[int(lo * len(order)) : int(hi * len(order))]
    images = torch.from_numpy(data.images[idx].astype(np.float32) / 16.0)
    labels = torch.from_numpy(data.target[idx].astype(np.int64))
    return images, labels


def to_pixels(images8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> (N, 1, 32, 32) in [0, 1], bilinear (smooth strokes)."""
    x = images8[:, None]
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of (N, C, H, W) by up to ``max_shift`` pixels (zero fill): cheap augmentation."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4)
    out = torch.empty_like(x)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    h, w = x.shape[-2:]
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = pad[i, :, dy : dy + h, dx : dx + w]
    return out
