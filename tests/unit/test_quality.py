"""The evaluator, checked on real digits (it must accept them and reject noise)."""

import numpy as np
import torch

from evaluation.digits import load_split, to_pixels
from evaluation.metrics import digit_metrics, frechet_distance


def _as_rgb(pixels: torch.Tensor) -> np.ndarray:
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)


def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6  # float64 round-off of tr(A) + tr(A) - 2 tr(sqrtm(A A)) (measured 5e-15)
    assert frechet_distance(a, a + 3.0) > 8 * 9 * 0.9  # mean shift of 3 in 8 dims: ~72


def test_real_heldout_digits_score_as_real():
    images8, labels = load_split("heldout")
    m = digit_metrics(_as_rgb(to_pixels(images8)), labels.numpy())
    assert m["prompt_accuracy"] >= 0.95 and m["classifier_heldout_accuracy"] >= 0.95
    assert m["frechet_distance"] < 1e-6  # identical to the reference set: the same features, float64 round-off (measured 5e-12)
    assert m["n_images"] == len(labels)


def test_generator_split_is_close_and_noise_is_far():
    images8, labels = load_split("generator")
    real = digit_metrics(_as_rgb(to_pixels(images8[:300])), labels[:300].numpy())
    noise = digit_metrics(np.random.default_rng(0).random((300, 32, 32, 3), dtype=np.float32), labels[:300].numpy())
    assert real["prompt_accuracy"] >= 0.95
    assert noise["prompt_accuracy"] < 0.3
    assert noise["frechet_distance"] > 10 * real["frechet_distance"]
