"""Shared helpers for the stage-2 (export) tests: masked models, plans, relative errors."""

from __future__ import annotations

import copy

import torch

from export.surgery import apply_plan, mask_like_plan, structured_plan
from tests.factories import tiny_sd3_transformer


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (error relative to the reference's scale; works for torch or numpy)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def masked_and_compact(ratio: float = 0.3, seed: int = 0, **factory_kwargs):
    """(plan, masked model, compact model) for a tiny transformer with a random structured plan."""
    dense = tiny_sd3_transformer(seed=seed, **factory_kwargs)
    plan = structured_plan(dense, ratio, generator=torch.Generator().manual_seed(seed + 100))
    masked = mask_like_plan(dense, plan)
    compact = apply_plan(copy.deepcopy(masked), plan, require_masked=True)
    return plan, masked, compact


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def make_nm_sparse(model, n: int = 2, m: int = 4, prefix: str = "transformer_blocks."):
    """Magnitude N:M masking along K (``nn.Linear`` input dim) of every linear under ``prefix`` (in place).

    Returns the pruned layer names. A stand-in for stage 1's OBS output: the export side only sees zeros.
    """
    names = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith(prefix):
                w = mod.weight  # (out, K)
                groups = w.reshape(w.shape[0], -1, m)  # (out, K/m, m)
                drop = groups.abs().argsort(dim=-1)[..., : m - n]  # smallest m-n per group
                groups.scatter_(-1, drop, 0.0)
                names.append(name)
    return names


# ---- one component exported and checked at once (stage 2 splits the two to bound memory; tests need not) ---


def export_and_check(component, module, path, *, latent_hw=None, seq_len=None, precision: str = "fp32", parity_batches=(1, 3)) -> dict:
    """Export ``module`` as the family's ``component`` (:class:`families.components.Component`) to ``path`` on a
    converted copy, then run its ONNX Runtime parity check; returns the summary with ``parity``."""
    from export.dynamo_export import export_component

    wrapper = component.wrapper(module)
    make = component.example_inputs(module, latent_hw=latent_hw, seq_len=seq_len)
    summary, ref = export_component(component.name, wrapper, make, path, precision=precision, parity_batches=parity_batches,
                                    keep_fp32=component.keep_fp32)
    if ref is not None:
        summary["parity"] = ref.check(component.name).to_dict()
    return summary


def family_component(family_or_model, name: str):
    """The component ``name`` of a family (adapter name such as ``"sd3"``, or a transformer of that family)."""
    from families import adapter_for, get_adapter
    from families.components import find_component

    adapter = get_adapter(family_or_model) if isinstance(family_or_model, str) else adapter_for(family_or_model)
    return find_component(adapter, name)


def export_transformer(model, path, *, latent_hw, text_seq_len, precision: str = "fp32", parity_batches=(1, 3)) -> dict:
    """Export a transformer of any family (dense or compact) to ``path``; see :func:`export_and_check`."""
    return export_and_check(family_component(model, "transformer"), model, path, latent_hw=latent_hw, seq_len=text_seq_len,
                            precision=precision, parity_batches=parity_batches)


# ---- cached exports shared by several test modules (one torch.onnx.export costs ~15 s here) ------------

import functools  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

EXPORT_LATENT = (8, 8)
EXPORT_TEXT = 6


def _tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="export-tests-"))


@functools.lru_cache(maxsize=None)
def exported_sparse_dense():
    """(model, 2:4 layer names, onnx path): a dense-shaped tiny SD3 transformer with 2:4 block linears, fp32."""
    model = tiny_sd3_transformer(num_layers=2, seed=3)
    layers = make_nm_sparse(model)
    path = _tmpdir() / "transformer.onnx"
    summary = export_transformer(model, path, latent_hw=EXPORT_LATENT, text_seq_len=EXPORT_TEXT, parity_batches=(1, 3))
    return model, tuple(layers), path, summary


@functools.lru_cache(maxsize=None)
def exported_compact():
    """(plan, masked, compact, onnx path, summary): SD3.5-style dual-attention tiny model at structured 0.3, fp32."""
    plan, masked, compact = masked_and_compact(ratio=0.3, num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm")
    path = _tmpdir() / "transformer.onnx"
    summary = export_transformer(compact, path, latent_hw=EXPORT_LATENT, text_seq_len=EXPORT_TEXT, parity_batches=(1, 3))
    return plan, masked, compact, path, summary


def write_model_dir(parent, transformer, name: str = "random") -> Path:
    """A local diffusers model directory ``parent/name`` holding the model index and ``transformer``'s config (no
    weights): the ``--model`` that a stage-1 directory of a factory transformer was made for (its plan's ``model``
    is ``name``; :func:`export.surgery.structured_plan` says ``random``). Enough for the stages that compare their
    input with ``--model`` and export only the given transformer."""
    d = Path(parent) / name
    (d / "transformer").mkdir(parents=True)
    (d / "model_index.json").write_text('{"_class_name": "%s"}' % ("FluxPipeline" if "Flux" in type(transformer).__name__ else "StableDiffusion3Pipeline"))
    transformer.save_config(d / "transformer")
    return d


def write_stage1_dir(directory, masked, plan) -> Path:
    """A stage-1 output directory as the shared interface defines it: plan.json + transformer/ (diffusers)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan.save(directory / "plan.json")
    masked.save_pretrained(directory / "transformer")
    return directory
