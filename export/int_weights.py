"""The integer weights of a ``--weight-bits`` prune through stage 2.

Stage 1 writes them beside its float weights (``transformer/weights_int.safetensors``: per quantized layer
``codes`` int8, ``scales`` float16 and, where its structured groups removed columns, the kept ``columns``; the float
weights are exactly ``codes x scales``). Here they are read and checked against the float weights
(:func:`attach`), ride through surgery on each ``nn.Linear`` as plain attributes (``weight_scales``, the kept
``weight_columns``, the ``weight_quant`` grid; :func:`export.surgery.keep_rows` / ``keep_cols`` carry them), are
saved beside the compact checkpoint (:func:`save_int`, :func:`load_int`) and handed to the ONNX writers
(:func:`int_layers`): nothing after stage 1 re-quantizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from families.base import get_module
from obsdiff.weight_quant import WeightQuant, codes_of, dequantize, on_grid

INT_FILE = "weights_int.safetensors"


def _read(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError(f"missing {file}: the plan says the weights are quantized; re-run `python -m pipeline prune`")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]}); re-run `python -m pipeline prune`") from None


def attach(model: nn.Module, plan, directory: str | os.PathLike) -> int:
    """Give every layer the plan quantized its scales, grid and kept columns, read from ``directory`` (stage 1's
    ``transformer/``), after checking that its float weight is exactly ``codes x scales`` there (zero in removed
    columns). Returns the number of quantized layers; 0 for a float plan."""
    wq = WeightQuant.from_json(plan.weight_quant) if plan is not None else None
    if wq is None:
        return 0
    file = Path(directory) / plan.weight_quant.get("file", INT_FILE)
    tensors = _read(file)
    names = [n for n, entry in plan.layers.items() if entry.get("weight_bits")]
    for name in names:
        layer = get_module(model, name)
        codes, scales = tensors.get(f"{name}.codes"), tensors.get(f"{name}.scales")
        if not isinstance(layer, nn.Linear) or codes is None or scales is None:
            raise UserError(f"{file} has no integer weights for {name}, or the model has no such layer; re-run `python -m pipeline prune`")
        columns = tensors.get(f"{name}.columns")
        W = layer.weight.detach().to(torch.float32)
        Wk = W if columns is None else W[:, columns]
        if Wk.shape != codes.shape or not torch.equal(dequantize(codes, scales, wq.group_size), Wk) or (
            columns is not None and int((W != 0).sum()) != int((Wk != 0).sum())
        ):
            raise UserError(f"{name}: the float weights in {directory} are not the integer weights of {file} (another prune?); "
                            "re-run `python -m pipeline prune`")
        layer.weight_quant, layer.weight_scales, layer.weight_columns = wq, scales.to(torch.float32), columns
    return len(names)


def int_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The quantized layers of ``model`` by qualified name (those carrying ``weight_scales``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and getattr(m, "weight_scales", None) is not None}


def layer_codes(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, WeightQuant]:
    """``(codes int8 (out, in), scales float32 (out, groups), grid)`` of a compact quantized layer (its columns all
    kept), checked: its weight must be exactly ``codes x scales``."""
    if layer.weight_columns is not None:
        raise UserError("a quantized layer still has removed columns: cut the model with its plan first")
    W = layer.weight.detach().to(torch.float32)
    if not on_grid(W, layer.weight_scales, layer.weight_quant):
        raise UserError("a quantized layer's weight left its integer grid (changed after stage 1?)")
    return codes_of(W, layer.weight_scales, layer.weight_quant), layer.weight_scales, layer.weight_quant


def int_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The compact model's integer weights as a state dict (``<layer>.codes`` int8, ``<layer>.scales`` float16) and
    the grid's JSON (None when nothing is quantized)."""
    state, grid = {}, None
    for name, layer in int_layers(model).items():
        codes, scales, wq = layer_codes(layer)
        state[f"{name}.codes"], state[f"{name}.scales"], grid = codes.contiguous(), scales.to(torch.float16).contiguous(), wq.to_json()
    return state, grid


def save_int(model: nn.Module, directory: Path) -> bool:
    """Write the compact model's integer weights to ``directory/weights_int.safetensors`` (nothing when it has none)."""
    import json

    from safetensors.torch import save_file

    state, grid = int_state(model)
    if not state:
        return False
    save_file(state, str(directory / INT_FILE), metadata={"weight_quant": json.dumps(grid)})
    return True


def load_int(model: nn.Module, directory: Path) -> int:
    """Attach the integer weights :func:`save_int` wrote to the rebuilt compact ``model``; returns their layer count."""
    import json

    from safetensors import safe_open

    file = directory / INT_FILE
    if not file.is_file():
        return 0
    with safe_open(str(file), "pt") as f:
        wq = WeightQuant.from_json(json.loads((f.metadata() or {}).get("weight_quant", "null")))
    if wq is None:
        raise UserError(f"{file} does not say its integer grid; re-run `python -m pipeline export`")
    tensors = _read(file)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for name in names:
        layer = get_module(model, name)
        if not isinstance(layer, nn.Linear) or not torch.equal(dequantize(tensors[f"{name}.codes"], tensors[f"{name}.scales"], wq.group_size),
                                                              layer.weight.detach().to(torch.float32)):
            raise UserError(f"{file}: the integer weights of {name} are not the checkpoint's float weights; re-run `python -m pipeline export`")
        layer.weight_quant, layer.weight_scales, layer.weight_columns = wq, tensors[f"{name}.scales"].to(torch.float32), None
    return len(names)
