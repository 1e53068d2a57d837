"""PrunePlan: what stage 1 decided, as JSON (``plan.json``), read by stage 2.

The plan is the contract between pruning and surgery. For every transformer block it records the kept
attention-head indices and kept FFN-neuron indices (``None`` = nothing removed there), so stage 2 can cut
the network without looking at weights. Per pruned layer it records the pattern and measured density.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from common.errors import UserError
from common.io import read_json, write_json

PLAN_VERSION = 1


@dataclass
class BlockPlan:
    """Structured decisions for one ``JointTransformerBlock``.

    keep_heads: kept head indices of ``attn`` (image and text branch share them), sorted.
    keep_heads_attn2: kept head indices of SD3.5's second (image-only) attention, if the block has one.
    keep_ff / keep_ff_context: kept hidden neurons of ``ff`` / ``ff_context`` (``net.0.proj`` rows and
        ``net.2`` columns), sorted.
    """

    index: int
    num_heads: int
    ff_dim: int
    keep_heads: list[int] | None = None
    keep_heads_attn2: list[int] | None = None
    keep_ff: list[int] | None = None
    keep_ff_context: list[int] | None = None

    @property
    def is_cut(self) -> bool:
        return any(v is not None for v in (self.keep_heads, self.keep_heads_attn2, self.keep_ff, self.keep_ff_context))


@dataclass
class PrunePlan:
    """Everything stage 2 needs to rebuild and cut the pruned transformer.

    sparsity: canonical pattern string (``2:4``, ``structured:0.3``...), parsed with ``parse_sparsity``.
    layers: per pruned ``nn.Linear`` (qualified name inside the transformer): ``{"density": float}``.
    packages: list of lists of layer names, in pruning order; ``done_packages`` counts finished ones
        (a partial plan is what resume reads).
    """

    model: str
    sparsity: str
    method: str
    head_dim: int
    num_layers: int
    blocks: list[BlockPlan]
    calibration: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    packages: list[list[str]] = field(default_factory=list)
    done_packages: int = 0
    version: int = PLAN_VERSION

    @property
    def complete(self) -> bool:
        return self.done_packages >= len(self.packages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "PrunePlan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise UserError(f"{source}: plan version {d.get('version')!r} is not {PLAN_VERSION}; re-run `python -m pipeline prune`")
            blocks = [BlockPlan(**b) for b in d["blocks"]]
            rest = {k: v for k, v in d.items() if k != "blocks"}
            plan = cls(blocks=blocks, **rest)
        except (KeyError, TypeError) as e:
            raise UserError(f"{source}: not a valid prune plan ({e}); re-run `python -m pipeline prune`") from None
        if [b.index for b in plan.blocks] != list(range(plan.num_layers)):
            raise UserError(f"{source}: plan lists blocks {[b.index for b in plan.blocks]}, expected 0..{plan.num_layers - 1}")
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrunePlan":
        return cls.from_dict(read_json(path), source=str(path))
