"""Compact checkpoint: ``model.safetensors`` + ``compact.json``, and a loader that rebuilds the module.

``compact.json`` holds the diffusers transformer class and config (the dense architecture), every block's
kept sizes per structured group of its family adapter (heads, FFN widths), the plan that produced them (or
``null`` for a dense model), and the SHA-256 of the weights file. The loader builds the transformer class
from the config, cuts the recorded shapes with :func:`export.surgery.cut_to_shapes`, and loads the weights
with ``strict=True``. No pickled module is ever read; any mismatch ends with one :class:`UserError` line.
Version-1 descriptions (``sd3-compact``, SD3 only, written before the family adapters) still load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import CheckFailed, UserError
from common.input_files import check_input_tree
from common.io import atomic_path, read_json, sha256_file
from export.int_weights import INT_FILE, load_int, save_int
from export.surgery import BlockShape, block_shapes, cut_to_shapes
from obsdiff.plan import PrunePlan

log = logging.getLogger(__name__)

COMPACT_FORMAT = "compact-transformer"
COMPACT_VERSION = 2
_V1_FORMAT = "sd3-compact"
WEIGHTS = "model.safetensors"
DESCRIPTION = "compact.json"


def _plain_config(model: nn.Module) -> dict[str, Any]:
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def describe(model: nn.Module, plan: PrunePlan | None) -> dict[str, Any]:
    """The ``compact.json`` content for ``model`` (without the weights hash)."""
    return {
        "format": COMPACT_FORMAT,
        "version": COMPACT_VERSION,
        "class": type(model).__name__,
        "config": _plain_config(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "blocks": [s.to_dict() for s in block_shapes(model)],
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "plan": plan.to_dict() if plan is not None else None,
    }


def save_compact(model: nn.Module, out_dir: str | os.PathLike, plan: PrunePlan | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/compact.json`` atomically (the directory appears whole).

    plan: the plan the model was cut with (``None`` for a dense model); its kept sizes must match the model.
    """
    from safetensors.torch import save_file

    if plan is not None:
        _check_plan_vs_shapes(plan, block_shapes(model), "model")
    out_dir = Path(out_dir)
    desc = describe(model, plan)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"format": COMPACT_FORMAT})
        desc["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        if save_int(model, tmp):  # the integer weights of a --weight-bits prune, beside the float ones
            desc["int_weights"] = INT_FILE
        (tmp / DESCRIPTION).write_text(json.dumps(desc, indent=2) + "\n")
    log.info("compact checkpoint: %s (%d parameters)", out_dir, desc["num_parameters"])
    return out_dir


def verify_compact(path: str | os.PathLike, model: nn.Module) -> None:
    """Check that the checkpoint at ``path`` holds ``model`` exactly (raises ``RuntimeError`` if not).

    The description's block shapes must be the model's, and every tensor in the file must equal the model's
    byte for byte; the file is read back one tensor at a time, so even a 2B-parameter transformer is never
    held twice (the loader, :func:`load_compact`, is tested on its own).
    """
    path = Path(path)
    desc = read_json(path / DESCRIPTION)
    if desc.get("blocks") != [s.to_dict() for s in block_shapes(model)]:
        raise CheckFailed(f"{path / DESCRIPTION} records other block shapes than the model it was saved from")
    bad = _compare_safetensors(path / WEIGHTS, model.state_dict())
    if bad:
        raise CheckFailed(f"compact checkpoint round trip changed {len(bad)} tensors (e.g. {bad[0]})")


def _compare_safetensors(file: Path, state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of ``state`` that ``file`` does not hold byte for byte (plus missing/extra ones).

    Reads the file with plain reads, one tensor at a time, rather than memory-mapping it: a mapping's pages
    stay resident until it is closed, which would count a second copy of the model. Format: an 8-byte
    little-endian header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the data.
    """
    import struct

    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        bad = sorted(set(header) ^ set(state))
        for name, t in state.items():
            if name not in header:
                continue
            start, end = header[name]["data_offsets"]
            f.seek(8 + n + start)
            saved = f.read(end - start)
            mine = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            if saved != mine or list(t.shape) != header[name]["shape"]:
                bad.append(name)
    return bad


def expected_shapes(plan: PrunePlan, dense_shapes: list[BlockShape]) -> list[BlockShape]:
    """Block sizes after cutting a dense model of ``dense_shapes`` with ``plan``."""
    return [BlockShape(d.index, {n: len(bp.keep[n]) if n in bp.keep else size for n, size in d.sizes.items()}) for bp, d in zip(plan.blocks, dense_shapes)]


def _check_plan_vs_shapes(plan: PrunePlan, shapes: list[BlockShape], what: str) -> None:
    if len(plan.blocks) != len(shapes):
        raise UserError(f"plan has {len(plan.blocks)} blocks, the {what} has {len(shapes)}; they belong to different models")
    for bp, s in zip(plan.blocks, shapes):
        for name, keep in bp.keep.items():
            if len(keep) != s.sizes.get(name):
                raise UserError(f"plan keeps {len(keep)} units of {name} in block {bp.index} but the {what} has {s.sizes.get(name)}; plan and {what} do not match")


def _shapes_from(desc: dict[str, Any]) -> list[BlockShape]:
    """Block shapes of a description (version 1: SD3's named fields; None sizes mean "no such group")."""
    if desc.get("format") == _V1_FORMAT:
        from families import get_adapter

        return [BlockShape(b["index"], {name: b[f] for f, name in get_adapter("sd3").v1_compact_sizes.items() if b.get(f) is not None}) for b in desc["blocks"]]
    return [BlockShape(b["index"], dict(b["sizes"])) for b in desc["blocks"]]


def transformer_class(name: str):
    """The diffusers transformer class ``name``, if a family adapter handles it (one-line error otherwise)."""
    import diffusers

    from families import adapter_for

    adapter_for(name)  # refuses classes no family handles
    return getattr(diffusers, name)


def load_compact(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, PrunePlan | None]:
    """Rebuild the compact transformer saved by :func:`save_compact`; return ``(model, plan)`` (eval mode).

    dtype: cast after loading (default: the stored dtype).
    Raises :class:`UserError` with one line on a missing/corrupt file or any shape/key mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    desc = read_json(path / DESCRIPTION)
    if (desc.get("format"), desc.get("version")) not in ((COMPACT_FORMAT, COMPACT_VERSION), (_V1_FORMAT, 1)):
        raise UserError(f"{path / DESCRIPTION} is not a {COMPACT_FORMAT} v{COMPACT_VERSION} description; re-run `python -m pipeline export`")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"missing file {weights}; re-run `python -m pipeline export`")
    if desc.get("weights_sha256") and sha256_file(weights) != desc["weights_sha256"]:
        raise UserError(f"{weights} does not match the hash in {DESCRIPTION} (corrupt or replaced); re-run `python -m pipeline export`")
    try:
        shapes = _shapes_from(desc)
        cls = transformer_class(desc.get("class", ""))
        plan = PrunePlan.from_dict(desc["plan"], source=str(path / DESCRIPTION)) if desc.get("plan") is not None else None
        config = desc["config"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path / DESCRIPTION} is malformed ({e}); re-run `python -m pipeline export`") from None
    if plan is not None:
        _check_plan_vs_shapes(plan, shapes, "checkpoint description")

    try:
        model = cls.from_config(config)
    except Exception as e:  # diffusers raises several types for a bad config
        raise UserError(f"{path / DESCRIPTION}: cannot build the transformer from its config ({str(e).splitlines()[0]})") from None
    cut_to_shapes(model, shapes)

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0]}); re-run `python -m pipeline export`") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise UserError(
            f"{weights} does not match {DESCRIPTION}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(e.g. {first}); re-run `python -m pipeline export`"
        )
    wrong = [k for k in expected if expected[k] != got[k]]
    if wrong:
        k = wrong[0]
        raise UserError(f"{weights} does not match {DESCRIPTION}: {k} has shape {list(got[k])}, expected {list(expected[k])}; re-run `python -m pipeline export`")
    model.load_state_dict(state, strict=True)
    if desc.get("int_weights"):
        load_int(model, path)
    model = model.to(dtype=dtype or getattr(torch, desc.get("dtype", "float32"))).eval()
    return model, plan


def find_transformer_dir(path: str | os.PathLike, *, option: str = "--transformer") -> Path:
    """The transformer directory inside anything a stage wrote, or a one-line :class:`UserError`.

    Accepted: a ``prune`` output directory (``plan.json`` + ``transformer/``) or its ``transformer/``
    (diffusers format, dense shapes, pruned weights zero), an ``export`` output directory or its
    ``compact/`` (the compact checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{option} {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{option} {path} is not a directory; give a prune or export output directory")
    for candidate in (path, path / "compact", path / "transformer"):
        if (candidate / DESCRIPTION).is_file() or (candidate / "config.json").is_file():
            check_input_tree(candidate, fix="rerun the stage that wrote it (`python -m pipeline prune` or `export`)")
            return candidate
    if (path / "plan.json").is_file():
        raise UserError(f"{option} {path} holds a plan but no transformer/ (an unfinished prune); rerun `python -m pipeline prune`")
    raise UserError(f"{option} {path} holds no transformer: give a prune output directory (or its transformer/) "
                    f"or an export output directory (or its compact/)")


def _family_of(class_name: str | None) -> str | None:
    from families import ADAPTERS

    return next((a.name for a in ADAPTERS.values() if a.transformer_class == class_name), None)


def check_transformer_model(directory: str | os.PathLike, spec, *, option: str = "--transformer") -> None:
    """One line when the transformer in ``directory`` (as :func:`find_transformer_dir` returns it) was made for
    another model than ``spec``: what its stage recorded (a prune directory's ``plan.json``; a compact
    checkpoint's plan and the export report beside it: model, family, weights fingerprint) and its architecture
    (``config.json`` or ``compact.json``'s class and config) against ``spec``'s."""
    from families.registry import other_model, transformer_difference

    directory = Path(directory)
    if (directory / DESCRIPTION).is_file():
        desc = read_json(directory / DESCRIPTION, what="compact checkpoint description")
        plan = desc.get("plan") if isinstance(desc.get("plan"), dict) else {}
        report_file = directory.parent / "export_report.json"
        report = read_json(report_file, what="export report") if directory.name == "compact" and report_file.is_file() else {}
        config = {"_class_name": desc.get("class"), **(desc.get("config") or {})}
        weights = (report.get("inputs") or {}).get("model_weights") or plan.get("model_weights")
        model, family = report.get("model") or plan.get("model"), plan.get("family") or _family_of(desc.get("class"))
    else:
        plan_file = directory.parent / "plan.json"
        plan = read_json(plan_file, what="prune plan") if directory.name == "transformer" and plan_file.is_file() else {}
        config = read_json(directory / "config.json", what="transformer config")
        model, family, weights = plan.get("model"), plan.get("family"), plan.get("model_weights")
    fix = (f"pass --model {model}, or " if model else "") + f"give a transformer made for {spec.id}"
    other = other_model(spec, model=model, family=family, weights=weights) if model else None
    if other:
        raise UserError(f"{option} {directory} {other}; {fix}")
    differs = transformer_difference(spec, config)
    if differs:
        raise UserError(f"{option} {directory}: its transformer is not {spec.id}'s ({differs}); {fix}")


def load_any_transformer(path: str | os.PathLike, *, option: str = "--transformer"):
    """Load the transformer found by :func:`find_transformer_dir` (float32, eval mode)."""
    directory = find_transformer_dir(path, option=option)
    if (directory / DESCRIPTION).is_file():
        return load_compact(directory)[0]
    try:
        cls = transformer_class(read_json(directory / "config.json", what="transformer config").get("_class_name", ""))
        return cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as e:  # as stage 2 reports an unreadable stage-1 transformer
        raise UserError(f"cannot load {directory}: {str(e).splitlines()[0]}; re-run `python -m pipeline prune`") from None
