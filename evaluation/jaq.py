"""The scores a reference-free scheduler correction maximises (JAQ, after Q-Sched arXiv 2509.01624).

- :func:`clip_jaq`: the paper's ``log(CLIP score) + k * CLIP-IQA`` with locally cached CLIP weights;
- :func:`digits_jaq`: its analogue on the embedded digit classifier, for the digit models;
- :func:`default_score_fn`: the one that fits a registry model.

A score function takes ``(images (N, H, W, 3) in [0, 1], prompts)`` and returns a float, higher is better.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from common.errors import UserError
from evaluation.classifier import load_classifier
from evaluation.digits import TEMPLATES, load_split, prompt_for, to_pixels
from evaluation.metrics import CLIP_SCORE_MODEL, frechet_distance, images_to_classifier_input

ScoreFn = Callable[[np.ndarray, Sequence[str]], float]


def default_score_fn(spec) -> ScoreFn:
    """:func:`digits_jaq` for models evaluated on digits (tiny-sd3), :func:`clip_jaq` otherwise."""
    return digits_jaq() if getattr(spec, "quality_metric", None) == "digits" else clip_jaq()


def digits_jaq(k: float = 1.0) -> ScoreFn:
    """JAQ on the embedded digit classifier: ``mean log p(prompted digit) - k * log FD`` (higher is better).

    Alignment (the paper's log CLIP score): the classifier's log-probability of the digit each prompt names
    (any training phrasing of :mod:`evaluation.digits`). Quality (the paper's CLIP-IQA): the Fréchet distance of
    the classifier's 64-d features of the images to those of the real digits of the *classifier* split (the
    evaluation's Fréchet distance uses the held-out split), on a log scale so that relative changes count.
    """

    classifier = load_classifier()
    digit_of = {prompt_for(d, t): d for t in TEMPLATES for d in range(10)}
    real, _ = load_split("classifier")
    with torch.no_grad():
        real_feats = classifier.features(to_pixels(real)).numpy()

    def score(images: np.ndarray, prompts: Sequence[str]) -> float:
        unknown = [p for p in prompts if p not in digit_of]
        if unknown:
            raise ValueError(f"digits_jaq scores digit prompts only, not {unknown[0]!r}")
        labels = torch.tensor([digit_of[p] for p in prompts])
        with torch.no_grad():
            x = images_to_classifier_input(images)
            logp = torch.log_softmax(classifier(x), dim=1)[torch.arange(len(labels)), labels]
            feats = classifier.features(x).numpy()
        fd = max(frechet_distance(feats, real_feats), 1e-6)
        return float(logp.mean()) - k * math.log(fd)

    score.name = f"digits-jaq(k={k:g})"
    return score


def clip_jaq(k: float = 2.0, model_name: str | None = None) -> ScoreFn:
    """The paper's JAQ score with locally cached CLIP weights: ``log(CLIP score) + k * CLIP-IQA``.

    CLIP score: 100 x cosine of image and prompt embeddings (clipped at 0, mean over images); CLIP-IQA: the
    probability of "Good photo." against "Bad photo." (the ``quality`` prompt pair of CLIP-IQA). k = 2 is the
    authors' default. One-line :class:`UserError` when the weights are not in the Hugging Face cache.
    """
    name = model_name or CLIP_SCORE_MODEL
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(name, local_files_only=True)
    except OSError:
        raise UserError(f"the reference-free CLIP score needs {name} in the local Hugging Face cache; download it, or fit with "
                        f"the dense model (runtime.qsched.trajectory_fit.fit_correction)") from None
    quality_prompts = ["Good photo.", "Bad photo."]

    def score(images: np.ndarray, prompts: Sequence[str]) -> float:
        pixels = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
        clip, iqa = [], []
        with torch.no_grad():
            for i in range(0, len(pixels), 8):
                inputs = proc(text=list(prompts[i : i + 8]) + quality_prompts, images=pixels[i : i + 8], return_tensors="pt", padding=True)
                out = model(**inputs)
                img = torch.nn.functional.normalize(out.image_embeds, dim=-1)  # (n, D)
                txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)  # (n + 2, D)
                n = img.shape[0]
                clip.append((100 * (img * txt[:n]).sum(-1)).clamp_min(0))
                iqa.append(torch.softmax(model.logit_scale.exp() * img @ txt[n:].T, dim=-1)[:, 0])
        return math.log(max(float(torch.cat(clip).mean()), 1e-6)) + k * float(torch.cat(iqa).mean())

    score.name = f"clip-jaq(k={k:g})"
    return score
