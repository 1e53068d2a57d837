"""Train the evaluation digit classifier on the ``classifier`` split (about 20 s on 2 cores).

    python scripts/train_digit_classifier.py [--out models/digit-classifier]

It reports its accuracy on the real ``heldout`` split, which it never sees.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import setup_logging  # noqa: E402
from evaluation.classifier import DEFAULT_DIR, DigitClassifier  # noqa: E402
from evaluation.digits import load_split, random_shift, to_pixels  # noqa: E402

log = logging.getLogger("train_digit_classifier")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup_logging()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    x8, y = load_split("classifier")
    x = to_pixels(x8)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = random_shift(x[idx], 2, g)
            # Robust to the generator's look: slight blur/contrast changes and pixel noise.
            xb = (xb * (0.8 + 0.4 * torch.rand(len(idx), 1, 1, 1, generator=g))).clamp(0, 1)
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=g)).clamp(0, 1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    xh8, yh = load_split("heldout")
    with torch.no_grad():
        acc = (model(to_pixels(xh8)).argmax(1) == yh).float().mean().item()
    log.info("held-out accuracy on real digits: %.4f (%d images)", acc, len(yh))
    from common.io import writing_repository_models

    with writing_repository_models():  # this script builds models/digit-classifier
        model.save(args.out, {"heldout_accuracy": acc, "n_heldout": len(yh), "epochs": args.epochs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
