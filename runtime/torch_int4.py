"""4-bit weights on the torch backend: torchao's INT4 weight-only tensors built from given codes and scales.

torchao 0.18's ``Int4WeightOnlyConfig`` quantizes float weights itself (its default ``plain`` packing runs mslk's
kernels; ``tile_packed_to_4d`` runs PyTorch's tinygemm ``aten._weight_int4pack_mm``), with its own asymmetric
min/max grid: fed stage 1's dequantized weights it does not reproduce stage 1's codes (:func:`torchao_requantization`
measures how many it keeps). So the tensors are built here from the codes directly. tinygemm stores a uint4 ``q`` and
per group ``(scale, zero)`` with ``w = (q - 8) x scale + zero``: ``q = code + 8`` and ``zero = 0`` is stage 1's
symmetric ``code x scale`` (:mod:`obsdiff.weight_quant`), nothing re-quantized.

- CUDA (SM80+): ``Int4TilePackedTo4dTensor`` (K padded to a multiple of 1024 and N to 8 with zero codes, as its
  ``from_hp`` pads), ``aten._weight_int4pack_mm``; bfloat16 activations and scales, so the float16 scales are
  rounded to bfloat16 (the only loss: :func:`scale_rounding`).
- CPU: ``Int4OpaqueTensor`` (torchao's CPU layout), ``aten._weight_int4pack_mm_for_cpu``, scales in the
  activations' dtype (float16 scales exact in float16 and float32); group 32, 64 or 128.

:func:`quantize_int4_` converts a model's linears in place (the codes of a ``--weight-bits 4`` compact checkpoint
where the layers carry them, else round-to-nearest on the same grid) and checks each converted layer against the
dequantized weight. Measured on a GPU by ``make gpu-check`` (docs/gpu-host.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)

GROUP_SIZE = 128
CUDA_GROUPS = (32, 64, 128, 256)  # tinygemm's CUDA kernel
CPU_GROUPS = (32, 64, 128)  # Int4OpaqueTensor
CUDA_KERNEL = "aten._weight_int4pack_mm (tinygemm, torchao Int4TilePackedTo4dTensor)"
CPU_KERNEL = "aten._weight_int4pack_mm_for_cpu (tinygemm CPU, torchao Int4OpaqueTensor)"
# A converted layer against F.linear with the dequantized weight, max |diff| / max |ref| on random rows: both round
# the activations and products to bfloat16 (unit roundoff 2^-9 ~ 2e-3) in another order, and on CUDA the scales are
# bfloat16 (another 2^-9 per weight); 3e-2 is ~15 roundoffs, while one code off by one step in a 128-group moves
# a row by ~1/sqrt(K) of its scale and a wrong packing or transposition gives errors of order 1.
LAYER_TOLERANCE = 3e-2


def tinygemm_qparams(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int32 (N, K) = codes + 8, scale_and_zero (groups, N, 2) in dtype with zero 0)``: tinygemm's layout of
    symmetric ``codes`` int8 ``(N, K)`` in ``[-8, 7]`` and ``scales`` ``(N, groups)``."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    if codes.min() < -8 or codes.max() > 7:
        raise ValueError("codes outside [-8, 7] are not 4-bit")
    s = scales.to(dtype)
    return codes.to(torch.int32) + 8, pack_tinygemm_scales_and_zeros(s, torch.zeros_like(s), dtype)


def int4_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int, *, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """The torchao INT4 weight-only tensor of ``codes`` ``(N, K)`` and ``scales`` ``(N, K / group_size)`` on
    ``device`` (see the module docstring); it computes with ``dtype`` activations."""
    device = torch.device(device)
    n, k = codes.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    if device.type == "cuda":
        from torchao.quantization import Int4TilePackedTo4dTensor
        from torchao.utils import find_multiple

        if group_size not in CUDA_GROUPS or dtype != torch.bfloat16:
            raise ValueError(f"tinygemm's CUDA kernel takes groups {CUDA_GROUPS} and bfloat16 activations")
        n_pad, k_pad = find_multiple(n, 8), find_multiple(k, 1024)  # what Int4TilePackedTo4dTensor.from_hp pads to
        c = torch.zeros((n_pad, k_pad), dtype=torch.int8, device=device)
        c[:n, :k] = codes.to(device)
        s = torch.ones((n_pad, k_pad // group_size), dtype=torch.float32, device=device)
        s[:n, : k // group_size] = scales.to(device=device, dtype=torch.float32)
        q, sz = tinygemm_qparams(c, s, torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(), 8)
        return Int4TilePackedTo4dTensor(qdata=packed, scale_and_zero=sz, block_size=[1, group_size], shape=torch.Size([n, k]))
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    if group_size not in CPU_GROUPS:
        raise ValueError(f"tinygemm's CPU kernel takes groups {CPU_GROUPS}")
    q, sz = tinygemm_qparams(codes.cpu(), scales.cpu(), dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return Int4OpaqueTensor(qdata=packed, scale_and_zero=sz, block_size=[1, group_size], shape=torch.Size([n, k]))


def scale_rounding(scales: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest relative change of ``scales`` when stored in ``dtype`` (0: exact)."""
    s = scales.to(torch.float32)
    return float(((s.to(dtype).to(torch.float32) - s).abs() / s).max())


def torchao_requantization(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> dict[str, Any]:
    """What torchao's own INT4 weight-only quantizer (the tinygemm grid of ``Int4WeightOnlyConfig`` and
    ``Int4OpaqueTensor.from_hp``: asymmetric, min/max per group, float zero point) makes of the dequantized
    weights ``codes x scales``: the share of codes it keeps (``q - 8 == code``) and its weights' error relative
    to ``codes x scales`` (Frobenius). Runs on any device."""
    from torchao.quantization.quant_primitives import MappingType, _choose_qparams_affine_tinygemm, _dequantize_affine_tinygemm, _quantize_affine_tinygemm

    from obsdiff.weight_quant import dequantize

    w = dequantize(codes, scales, group_size)  # (N, K) float32
    block = [1, group_size]
    s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, w.dtype, w.dtype)
    q = _quantize_affine_tinygemm(w, block, s, z, torch.int32, 0, 15)
    wt = _dequantize_affine_tinygemm(q, block, s, z, torch.int32, 0, 15, output_dtype=torch.float32)
    return {"codes_kept": float(((q - 8) == codes.to(q.device).to(torch.int32)).float().mean()),
            "weight_rel_error": float(torch.linalg.norm(wt - w) / torch.linalg.norm(w))}


@dataclass
class Int4Report:
    """What :func:`quantize_int4_` did: converted layers, those left as they were (with the reason), the codes'
    source, the kernel and the per-layer check."""

    group_size: int
    kernel: str
    codes_from: str = ""
    converted: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    layer_max_rel_error: float = 0.0
    scale_rounding: float = 0.0
    requantization: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.layer_max_rel_error <= LAYER_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "kernel": self.kernel, "codes_from": self.codes_from, "int4_layers": len(self.converted),
                "left_high_precision": dict(self.left), "layer_check": {"max_rel_error": self.layer_max_rel_error, "tolerance": LAYER_TOLERANCE,
                                                                         "ok": self.ok},
                "scale_rounding_max_rel": self.scale_rounding, "torchao_requantization": self.requantization}


def layer_codes_or_rtn(layer: nn.Linear, group_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(codes int8 (N, K), scales float32 (N, groups), source)``: the stage-1 codes a compact checkpoint's layer
    carries (:func:`export.int_weights.layer_codes`), else round-to-nearest on the same symmetric grid."""
    from obsdiff.weight_quant import WeightQuant, codes_of, rtn_quantize

    if getattr(layer, "weight_scales", None) is not None:
        from export.int_weights import layer_codes

        codes, scales, grid = layer_codes(layer)
        if grid.bits != 4 or grid.group_size != group_size:
            raise UserError(f"the layer's integer weights are {grid.bits}-bit, group {grid.group_size}; the INT4 torch path needs 4-bit, group {group_size}")
        return codes, scales, "stage 1"
    wq = WeightQuant(bits=4, group_size=group_size, method="rtn")
    w, scales = rtn_quantize(layer.weight.detach().to(torch.float32), wq)
    return codes_of(w, scales, wq), scales, "round-to-nearest on stage 1's grid"


def quantize_int4_(model: nn.Module, names: list[str], group_size: int = GROUP_SIZE, *, check_rows: int = 8, seed: int = 0) -> Int4Report:
    """Replace the weight of each linear in ``names`` by its torchao INT4 tensor (in place, on the model's device,
    for the model's dtype); a linear whose K is not a multiple of ``group_size`` stays as it was. Each converted
    layer is compared with ``F.linear`` on its dequantized weight over ``check_rows`` random rows; the report
    holds the largest error (:data:`LAYER_TOLERANCE`), the scale rounding and, for the first layer, what torchao's
    own quantizer would keep of its codes."""
    from families.base import get_module

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    report = Int4Report(group_size=group_size, kernel=CUDA_KERNEL if device.type == "cuda" else CPU_KERNEL)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sources = set()
    for name in names:
        layer = get_module(model, name)
        if not isinstance(layer, nn.Linear):
            report.left[name] = "not an nn.Linear"
            continue
        n, k = layer.weight.shape
        if k % group_size:
            report.left[name] = f"K={k} is not a multiple of the group size {group_size}"
            continue
        codes, scales, source = layer_codes_or_rtn(layer, group_size)
        sources.add(source)
        if report.requantization is None:
            report.requantization = {"layer": name, **torchao_requantization(codes, scales, group_size)}
        with torch.no_grad():
            x = torch.randn((check_rows, k), generator=gen).to(device=device, dtype=dtype)
            ref = nn.functional.linear(x, (codes.to(torch.float32) * scales.repeat_interleave(group_size, 1)).to(device=device, dtype=dtype))
            w4 = int4_weight(codes, scales, group_size, dtype=dtype, device=device)
            got = nn.functional.linear(x, w4)
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
        report.layer_max_rel_error = max(report.layer_max_rel_error, err)
        report.scale_rounding = max(report.scale_rounding, scale_rounding(scales, torch.bfloat16 if device.type == "cuda" else dtype))
        layer.weight = nn.Parameter(w4, requires_grad=False)
        report.converted.append(name)
    report.codes_from = " and ".join(sorted(sources))
    log.info("torch INT4: %d linears on %s (group %d, codes from %s), %d left; layer check max rel. error %.1e (tolerance %.0e)",
             len(report.converted), report.kernel, group_size, report.codes_from or "-", len(report.left), report.layer_max_rel_error, LAYER_TOLERANCE)
    return report
