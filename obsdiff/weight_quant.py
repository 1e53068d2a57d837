"""The integer weight grid stage 1 solves onto: symmetric, per row and group of input columns.

A weight ``W`` ``(rows, cols)`` with ``WeightQuant(bits, group_size)`` is stored as integer codes
``q`` ``(rows, cols)`` in ``[-2^(bits-1), 2^(bits-1) - 1]`` and scales ``s`` ``(rows, ceil(cols / group_size))``,
with ``W = q * s`` repeated over each group's columns. The scale of a group is ``amax / (2^(bits-1) - 1)``
rounded to float16 (so ``q * s`` is exact in float32 and a float16 copy of the scales loses nothing; the
runtimes store them in float16 or float32). Symmetric, with no zero point, because every runtime this project
targets takes it as it is: ONNX Runtime's ``MatMulNBits`` (codes + 8, its default zero point), TensorRT's
blocked INT4 ``DequantizeLinear`` (zero points must be 0), torchao's INT4 weight-only and ModelOpt's INT4 AWQ
(both symmetric at block 128).

Pure functions over tensors; the OBS solver (:func:`obsdiff.solvers.obs_prune`) rounds to this grid column by
column, round-to-nearest (:func:`rtn_quantize`) is its peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError

WEIGHT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
QUANT_METHODS = ("obs", "rtn")


@dataclass(frozen=True)
class WeightQuant:
    """How stage 1 quantizes the weights it solves.

    bits: 4 or 8. group_size: input columns sharing one scale (a divisor of 256 from 32; 128 by default). method:
    ``obs`` (the error of each rounded column spread over the later ones through the inverse Hessian, jointly with
    the pruning pattern) or ``rtn`` (round to nearest after pruning: the peer).
    """

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    method: str = "obs"

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise UserError(f"--weight-bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.method not in QUANT_METHODS:
            raise UserError(f"--quant-method must be one of {', '.join(QUANT_METHODS)}, got {self.method!r}")

    @property
    def qmax(self) -> int:
        """The largest code, ``2^(bits-1) - 1`` (7 for 4 bits); the smallest is ``-qmax - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax - 1

    def groups(self, cols: int) -> int:
        """Scale groups of a weight with ``cols`` input columns (the last may be shorter)."""
        return -(-cols // self.group_size)

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method, "symmetric": True, "scale_dtype": "float16"}

    @classmethod
    def from_json(cls, d: dict | None) -> "WeightQuant | None":
        if not d:
            return None
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), method=str(d.get("method", "obs")))


def scales_for(W: torch.Tensor, wq: WeightQuant) -> torch.Tensor:
    """The scales of the columns ``W`` ``(rows, count)``, one group (``count <= group_size``): ``(rows,)`` float32,
    ``amax / qmax`` rounded to float16; rows that are all zero get scale 1 (their codes are 0 either way)."""
    amax = W.abs().amax(dim=1)  # (rows,)
    s = (amax / wq.qmax).to(torch.float16).to(torch.float32)
    # float16 underflows to 0 below 6e-8 and rounds amax/qmax down at most by 2^-11: both are handled by the clamp
    return torch.where(s > 0, s, torch.ones_like(s))


def round_to_grid(w: torch.Tensor, s: torch.Tensor, wq: WeightQuant, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` rounded to the codes of scale ``s`` (same shape, broadcast), as float values ``q * s``; written into
    ``out`` (``w``'s shape, not ``w`` itself) when given, with the same operations and so the same values."""
    if out is None:
        return torch.clamp(torch.round(w / s), wq.qmin, wq.qmax) * s
    return torch.div(w, s, out=out).round_().clamp_(wq.qmin, wq.qmax).mul_(s)


def group_scales(W: torch.Tensor, wq: WeightQuant) -> torch.Tensor:
    """Scales of every group of ``W`` ``(rows, cols)`` from its current values: ``(rows, groups)`` float32."""
    return torch.stack([scales_for(W[:, g : g + wq.group_size], wq) for g in range(0, W.shape[1], wq.group_size)], dim=1)


def expand_scales(scales: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """``(rows, groups)`` scales repeated over each group's columns: ``(rows, cols)``."""
    return scales.repeat_interleave(group_size, dim=1)[:, :cols]


def codes_of(W: torch.Tensor, scales: torch.Tensor, wq: WeightQuant) -> torch.Tensor:
    """The integer codes of ``W`` ``(rows, cols)`` on the grid of ``scales`` ``(rows, groups)``: int8 ``(rows, cols)``.

    For a ``W`` already on the grid (what the solvers return) this is exact: ``q * s`` is exact in float32.
    """
    s = expand_scales(scales.to(torch.float32), W.shape[1], wq.group_size)
    return torch.clamp(torch.round(W.to(torch.float32) / s), wq.qmin, wq.qmax).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``codes * scales`` as float32 ``(rows, cols)``."""
    return codes.to(torch.float32) * expand_scales(scales.to(torch.float32), codes.shape[1], group_size)


def on_grid(W: torch.Tensor, scales: torch.Tensor, wq: WeightQuant) -> bool:
    """Whether ``W`` is exactly ``codes * scales`` for in-range codes."""
    return bool(torch.equal(dequantize(codes_of(W, scales, wq), scales, wq.group_size), W.to(torch.float32)))


def rtn_quantize(W: torch.Tensor, wq: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(W_q, scales)`` with scales from ``W``'s own group maxima; zeros stay zero (so a pruned
    weight keeps its pattern)."""
    Wf = W.detach().to(torch.float32)
    scales = group_scales(Wf, wq)
    return round_to_grid(Wf, expand_scales(scales, Wf.shape[1], wq.group_size), wq).to(W.dtype), scales
