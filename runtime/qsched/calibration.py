"""The calibration runs both fits make: one batch of prompts x seeds through :func:`families.sampling.sample`,
and the record of them a fitted correction keeps."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def sample_calibration(pipe, spec, prompts, seeds, steps, guidance) -> np.ndarray:
    from families.sampling import sample

    # one batch: every calibration sample shares each step's coefficients
    return sample(pipe, spec, list(prompts), list(seeds), steps=steps, guidance=guidance, batch_size=len(prompts))


def calibration_record(prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    import hashlib

    return {"n": len(prompts), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "seeds": [int(s) for s in seeds]}
