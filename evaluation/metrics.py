"""Quality metrics of generated images, offline.

- :func:`digit_metrics`: for digit models (``tiny-sd3``, ``tiny-flux``), the committed digit classifier (trained on a
  split the generator never saw) reads the images: ``prompt_accuracy`` (share classified as the prompted digit),
  ``frechet_distance`` (Fréchet distance between the classifier's 64-d features of the generated images and of
  the real held-out digits), per-digit accuracy and the classifier's own held-out accuracy.
- :func:`clip_score`: for hub models, when CLIP weights are in the local Hugging Face cache (and says so when not).
- :func:`evaluate`: generates the fixed evaluation set with a pipeline and scores it.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import torch

from common.paths import REPO_ROOT
from evaluation.classifier import load_classifier
from evaluation.digits import load_split, prompt_for, to_pixels
from families.registry import ModelSpec
from families.sampling import sample

log = logging.getLogger(__name__)

DEFAULT_SEEDS = tuple(range(8))
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
EVAL_PROMPTS = REPO_ROOT / "prompts" / "eval.txt"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Features that are always zero (dead ReLUs) make the product singular; sqrtm still returns the
        # right root on the non-degenerate part, and a non-finite result is handled below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as pytorch-fid does
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def images_to_classifier_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 1, 32, 32) grayscale in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).mean(1, keepdim=True)
    if x.shape[-1] != 32:
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="area")
    return x


def digit_metrics(images: np.ndarray, digits: np.ndarray, classifier=None) -> dict:
    """Classifier-based metrics of generated digit images against the real held-out digits."""
    classifier = classifier or load_classifier()
    real8, real_labels = load_split("heldout")
    with torch.no_grad():
        x = images_to_classifier_input(images)
        logits = classifier(x)
        feats = classifier.features(x).numpy()
        real = to_pixels(real8)
        real_feats = classifier.features(real).numpy()
        real_acc = (classifier(real).argmax(1) == real_labels).float().mean().item()
    pred = logits.argmax(1).numpy()
    correct = pred == digits
    per_digit = {str(d): float(correct[digits == d].mean()) for d in range(10) if (digits == d).any()}
    return {
        "prompt_accuracy": float(correct.mean()),
        "frechet_distance": frechet_distance(feats, real_feats),
        "n_images": int(len(images)),
        "per_digit_accuracy": per_digit,
        "classifier_heldout_accuracy": real_acc,
        "n_real_reference": int(len(real_labels)),
    }


def evaluate(pipe, spec: ModelSpec, seeds=DEFAULT_SEEDS, *, steps: int | None = None, guidance: float | None = None) -> dict:
    """Generate the fixed evaluation set with ``pipe`` and score it (digits for tiny-sd3, CLIP otherwise)."""
    t0 = time.perf_counter()
    if spec.quality_metric == "digits":
        digits = np.array([d for s in seeds for d in range(10)])
        seed_list = [s for s in seeds for _ in range(10)]
        images = sample(pipe, spec, [prompt_for(int(d)) for d in digits], seed_list, steps=steps, guidance=guidance)
        result = digit_metrics(images, digits)
    else:
        prompts = [p for p in EVAL_PROMPTS.read_text().splitlines() if p.strip()]
        seed_list = [s for s in seeds for _ in prompts]
        all_prompts = [p for _ in seeds for p in prompts]
        images = sample(pipe, spec, all_prompts, seed_list, steps=steps, guidance=guidance, batch_size=4)
        result = {"n_images": int(len(images)), **clip_score(images, all_prompts)}
    result.update(
        model=spec.id,
        seeds=list(seeds),
        steps=spec.steps if steps is None else steps,
        guidance=spec.guidance if guidance is None else guidance,
        eval_seconds=round(time.perf_counter() - t0, 2),
    )
    return result


def clip_score(images: np.ndarray, prompts: list[str]) -> dict:
    """CLIP score (100 x cosine, clipped at 0) with locally cached CLIP weights, or a clear reason why not."""
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(CLIP_SCORE_MODEL, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(CLIP_SCORE_MODEL, local_files_only=True)
    except OSError:
        msg = f"CLIP score unavailable: {CLIP_SCORE_MODEL} is not in the local Hugging Face cache"
        log.warning(msg)
        return {"clip_score": None, "clip_score_note": msg}
    scores = []
    with torch.no_grad():
        for img, prompt in zip(images, prompts):
            inputs = proc(text=[prompt], images=[(img * 255).astype(np.uint8)], return_tensors="pt", padding=True)
            out = model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
            scores.append(max(100 * cos, 0.0))
    return {"clip_score": float(np.mean(scores)), "clip_model": CLIP_SCORE_MODEL}


