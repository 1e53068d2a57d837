"""PrunePlan: what stage 1 decided, as JSON (``plan.json``), read by stage 2.

The plan is the contract between pruning and surgery. For every transformer block it records, per
structured group of the family adapter (heads of an attention, neurons of an FFN), the dense size and the
kept indices of the groups that are cut, so stage 2 can cut the network without looking at weights. Per pruned layer it records the pattern and measured density.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from common.errors import UserError
from common.io import read_json, write_json

PLAN_VERSION = 2


@dataclass
class BlockPlan:
    """Structured decisions for one transformer block, keyed by the family adapter's group names
    (``attn``, ``ff``, ``ff_context``, ``attn2`` for SD3; ``attn``, ``mlp`` in Flux's single blocks...).

    sizes: units (heads or neurons) of every structured group of the dense block.
    keep: kept unit indices (sorted) of the groups that are cut; a group not listed keeps everything.
    """

    index: int
    sizes: dict[str, int] = field(default_factory=dict)
    keep: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_cut(self) -> bool:
        return bool(self.keep)

    @classmethod
    def from_v1(cls, d: dict[str, Any]) -> "BlockPlan":
        """A version-1 block (``num_heads``, ``ff_dim``, ``keep_heads``...) as version 2 (version 1 was SD3-only;
        the SD3 adapter maps its field names to group names)."""
        from families import get_adapter

        keep = {name: d[f] for f, name in get_adapter("sd3").v1_plan_fields.items() if d.get(f) is not None}
        return cls(index=d["index"], sizes={"attn": d["num_heads"], "ff": d["ff_dim"]}, keep=keep)


@dataclass
class PrunePlan:
    """Everything stage 2 needs to rebuild and cut the pruned transformer.

    family: the architecture's adapter (``sd3``, ``flux``...).
    sparsity: canonical pattern string (``2:4``, ``structured:0.3``...), parsed with ``parse_sparsity``.
    layers: per solved ``nn.Linear`` (qualified name inside the transformer): ``{"density": float, "shape": [out, in]}``,
        ``"weight_bits"`` when quantized, ``"pruned": false`` for an AdaLN modulation that is only quantized.
    packages: list of lists of layer names, in pruning order; ``done_packages`` counts finished ones
        (a partial plan is what resume reads).
    model_weights: the pruned model's :func:`families.registry.model_fingerprint` (None in older plans): the
        stages that take this plan check that they are given the same model.
    weight_quant: for a ``--weight-bits`` prune, the grid (:meth:`obsdiff.weight_quant.WeightQuant.to_json`) and the
        ``file`` in ``transformer/`` that holds the integer weights and scales (the quantized layers carry
        ``weight_bits`` in ``layers``); None for float weights.
    """

    model: str
    sparsity: str
    method: str
    head_dim: int
    num_layers: int
    blocks: list[BlockPlan]
    family: str = "sd3"
    calibration: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    packages: list[list[str]] = field(default_factory=list)
    done_packages: int = 0
    version: int = PLAN_VERSION
    model_weights: str | None = None
    weight_quant: dict[str, Any] | None = None

    @property
    def pruned_layers(self) -> list[str]:
        """The layers the pattern applies to: every solved layer but the AdaLN modulations a ``--quant-modulation``
        prune only quantizes (``"pruned": false`` in ``layers``)."""
        return [n for n, entry in self.layers.items() if entry.get("pruned", True)]

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
            version = d.get("version")
            if version == 1:  # SD3-only plans written before the family adapters
                blocks = [BlockPlan.from_v1(b) for b in d["blocks"]]
                rest = {k: v for k, v in d.items() if k not in ("blocks", "version")}
            elif version == PLAN_VERSION:
                blocks = [BlockPlan(**b) for b in d["blocks"]]
                rest = {k: v for k, v in d.items() if k != "blocks"}
            else:
                raise UserError(f"{source}: plan version {version!r} is not 1 or {PLAN_VERSION}; re-run `python -m pipeline prune`")
            plan = cls(blocks=blocks, **rest)
        except (KeyError, TypeError) as e:
            raise UserError(f"{source}: not a valid prune plan ({e}); re-run `python -m pipeline prune`") from None
        if [b.index for b in plan.blocks] != list(range(plan.num_layers)):
            raise UserError(f"{source}: plan lists blocks {[b.index for b in plan.blocks]}, expected 0..{plan.num_layers - 1}")
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrunePlan":
        return cls.from_dict(read_json(path), source=str(path))
