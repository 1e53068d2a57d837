"""Stage 2's float export of each component: the transformer (after the compact checkpoint, with its graph
checks and engine profiles) and the text encoders and VAE decoder (each loaded alone in its export
precision), each followed by its ONNX Runtime parity check once the torch module is freed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.dtypes import precision_dtype
from common.memory import log_memory, release_to_os
from export.compact_export import save_compact_transformer
from export.dynamo_export import export_component
from export.parity import plan_parity_memory
from export.transformer_checks import transformer_onnx_checks
from families.components import Component, find_component

if TYPE_CHECKING:
    from export.stage import ExportSettings
    from families.shapes import ServedShapes

log = logging.getLogger(__name__)


def export_float_transformer(spec, plan, holder: list, batches, settings: ExportSettings, out: Path, path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Surgery, compact checkpoint, ONNX, 2:4 checks, then ONNX Runtime parity after the torch model is freed.

    Peak memory: the transformer in the export precision (loaded straight in it), plus the graph and one
    tensor at a time while the ONNX is post-processed and checked, or ONNX Runtime's copy during parity.
    """
    served = settings.served
    save_compact_transformer(spec, plan, holder, batches, out, report, served)
    compact = holder.pop()
    shapes = spec.shapes
    comp = find_component(spec.adapter, "transformer")
    res, parity_ref = _export(comp, compact, path, settings.precision, batches, served, seq_len=shapes.text_seq_len,
                              latent_hw=(shapes.latent_height, shapes.latent_width), adapter=spec.adapter)
    report["transformer"].update(transformer_onnx_checks(path, compact, plan, shapes, shapes.batch_opt, settings.polygraphy, res))
    del compact
    release_to_os()
    log_memory("export: torch transformer freed", log)
    _check_parity("transformer", res, parity_ref)
    return res


def export_other_component(spec, name: str, precision: str, batches, path: Path, served: ServedShapes) -> dict[str, Any]:
    """Export a text encoder or the VAE decoder, loaded by itself in the precision it is exported in."""
    from families.registry import load_component

    comp = find_component(spec.adapter, name)
    dtype = torch.float32 if comp.keep_fp32 else precision_dtype(precision)
    shapes = spec.shapes
    module = load_component(spec, comp.attr, dtype=dtype)
    res, parity_ref = _export(comp, module, path, precision, batches, served, seq_len=comp.sequence_length(spec),
                              latent_hw=(shapes.latent_height, shapes.latent_width), adapter=spec.adapter)
    del module
    _check_parity(name, res, parity_ref)
    return res


def _attention_tokens(module, adapter, latent_hw: tuple[int, int], seq_len: int | None) -> int:
    """Tokens one attention of ``module`` sees at a latent shape: a transformer's (patch) image tokens plus
    its text tokens (joint attention), or a VAE's latent pixels (its mid-block attention)."""
    config = dict(getattr(module, "config", {}) or {})
    h, w = latent_hw
    if "patch_size" in config or "joint_attention_dim" in config:
        p = adapter.latent_patch(config)
        return (h // p) * (w // p) + int(seq_len or 0)
    return h * w


def _export(comp: Component, module, path: Path, precision: str, batches, served: ServedShapes, *, seq_len, latent_hw, adapter=None):
    """:func:`export.dynamo_export.export_component` of ``module`` (given up: converted in place) as the family's
    component ``comp`` describes it; a component whose shapes follow the resolution gets dynamic spatial axes,
    parity at every served latent shape and its engine profiles."""
    wrapper = comp.wrapper(module)
    make = comp.example_inputs(module, latent_hw=latent_hw, seq_len=seq_len)
    spatial = {"dynamic_shapes": comp.dynamic_shapes(module, served.latent_min, served.latent_max),
               "parity_shapes": served.other_latents if batches else ()} if comp.spatial else {}
    if comp.spatial and batches and adapter is not None:  # one line now, not an out-of-memory kill after the export
        cases = {str(b): (int(b), _attention_tokens(module, adapter, latent_hw, seq_len)) for b in batches}
        cases.update({f"1@{h}x{w}": (1, _attention_tokens(module, adapter, (h, w), seq_len)) for h, w in spatial["parity_shapes"]})
        heads = max((m.heads for m in module.modules() if isinstance(getattr(m, "heads", None), int)), default=0)
        if heads:
            plan_parity_memory(comp.name, cases, heads)
    res, parity_ref = export_component(comp.name, wrapper, make, path, precision=precision, parity_batches=batches, keep_fp32=comp.keep_fp32,
                                       in_place=True, **spatial)
    if comp.spatial:
        res["profiles"] = served.profiles(lambda b, hw: comp.input_shapes(module, b, hw, served.text_seq_len))
    return res, parity_ref


def _check_parity(name: str, res: dict[str, Any], parity_ref) -> None:
    """Run the ONNX Runtime side of the parity check (the torch module is freed by now) into ``res``."""
    if parity_ref is not None:
        res["parity"] = parity_ref.check(name).to_dict()
        if not res["parity"]["ok"]:
            raise RuntimeError(f"{name}: ONNX Runtime output differs from torch: {res['parity']}")
