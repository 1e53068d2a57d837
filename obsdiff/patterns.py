"""Sparsity patterns, parsed once at the edge of the program.

Accepted strings: ``2:4`` and ``4:8`` (N:M), ``unstructured:<ratio>``,
``structured:<ratio>``, ``dense``. Nothing deeper than the CLI sees the raw string.

N:M follows NVIDIA's convention: in every group of M consecutive weights along a weight's input (K)
dimension, at most N are non-zero (2:4 keeps 2 of 4, i.e. 50% sparsity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from common.errors import UserError

ACCEPTED = "2:4, 4:8, unstructured:<ratio in (0,1)>, structured:<ratio in (0,1)>, dense"

Kind = Literal["dense", "nm", "unstructured", "structured"]


@dataclass(frozen=True)
class Sparsity:
    """A parsed sparsity pattern.

    kind: ``dense`` | ``nm`` | ``unstructured`` | ``structured``.
    n, m: for ``nm``, keep ``n`` of every ``m`` weights along the input dimension.
    ratio: share of weights removed (``unstructured``), or share of attention heads and of FFN neurons
        removed per pruned block (``structured``); 0.5 for 2:4 and 4:8.
    """

    kind: Kind
    ratio: float = 0.0
    n: int = 0
    m: int = 0

    @property
    def id(self) -> str:
        """Canonical string, safe in directory names (``2-4``, ``unstructured-0.5``...)."""
        if self.kind == "nm":
            return f"{self.n}-{self.m}"
        if self.kind == "dense":
            return "dense"
        return f"{self.kind}-{self.ratio:g}"

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "dense":
            return "dense"
        return f"{self.kind}:{self.ratio:g}"

    @property
    def is_semi_structured(self) -> bool:
        return self.kind == "nm"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_RATIO = re.compile(r"^\s*(unstructured|structured)\s*:\s*([0-9]*\.?[0-9]+)\s*$")


def parse_sparsity(text: str) -> Sparsity:
    """Parse a sparsity string; raise :class:`UserError` listing the accepted forms on anything else."""
    s = str(text).strip().lower()
    if s == "dense":
        return Sparsity("dense")
    if m := _NM.match(s):
        n, mm = int(m.group(1)), int(m.group(2))
        if (n, mm) in ((2, 4), (4, 8)):
            return Sparsity("nm", ratio=1 - n / mm, n=n, m=mm)
    if m := _RATIO.match(s):
        ratio = float(m.group(2))
        if 0.0 < ratio < 1.0:
            return Sparsity(m.group(1), ratio=ratio)  # type: ignore[arg-type]
    raise UserError(f"unknown sparsity pattern {text!r}; accepted forms: {ACCEPTED}")
