"""ONNX export of a pipeline's transformer, text encoders and VAE decoder, and ONNX Runtime parity.

The transformer's wrapper, example inputs and I/O names come from its family adapter
(:meth:`families.base.FamilyAdapter.transformer_for_onnx`); the other components are shared kinds
(:data:`COMPONENT_KINDS`: CLIP with projection, CLIP pooled, T5, VAE decoder) listed per family.

Every component goes through the same path (:func:`export_module`):

1. ``torch.onnx.export(dynamo=True)`` at opset 18 with a **batch-2** example (``torch.export`` specialises a
   dimension whose example size is 1) and a dynamic ``batch`` dimension on every input and output;
2. weight initializers of ``MatMul``/``Gemm`` nodes are renamed after the torch parameter they come from
   (``transformer_blocks.0.attn.to_q.weight``), using the exporter's ``name_scopes`` node metadata;
3. clean-up with onnx-graphsurgeon: constant folding (which also folds a ``Transpose`` of a weight into a
   transposed initializer), dead-node removal, topological sort;
4. IR version capped at :data:`MAX_IR_VERSION` (what onnxruntime >= 1.20 and TensorRT 10 read);
5. saved atomically, with external data (``<name>.onnx.data``) when the model is over 2 GB.

``precision="fp16"`` converts the module to half before export, so the ONNX carries float16 weights and
activations (TensorRT 10/11 strongly-typed networks run what the ONNX says). What must stay float32 stays:
the transformer's ``timestep`` input (float16 cannot represent scheduler timesteps such as 987.65; diffusers
computes the sinusoidal embedding in float32 anyway), RMS norms (diffusers upcasts them itself), and, as a
post-processing step, every ``LayerNormalization`` is computed in float32 between two ``Cast`` nodes (the
variance of a 1536-wide fp16 row overflows easily; NVIDIA's TensorRT docs recommend fp32 layer norms).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from common.memory import log_memory


log = logging.getLogger(__name__)

OPSET = 18
MAX_IR_VERSION = 10
# Bytes of initializers above which weights live in an external data file and the graph is processed without
# them (protobuf's hard limit is 2 GiB). SDD_EXTERNAL_DATA_BYTES lowers it, so tests exercise that path on
# small models.
EXTERNAL_DATA_THRESHOLD = int(os.environ.get("SDD_EXTERNAL_DATA_BYTES", 2 * 1024**3 - 64 * 1024**2))
PRECISIONS = ("fp32", "fp16")
COMPONENT_KINDS = ("transformer", "clip_projection", "clip_pooled", "t5", "vae_decoder")


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16}[precision]


# --------------------------------------------------------------------------------------------------------
# Wrappers: the ONNX I/O contract of each component (names and meaning are shared with stage 3)
# --------------------------------------------------------------------------------------------------------


class ClipForOnnx(nn.Module):
    """``input_ids [B,L] int64 -> (text_embeds [B,P], penultimate_hidden_states [B,L,H])`` (SD3 uses ``hidden_states[-2]``)."""

    input_names = ("input_ids",)
    output_names = ("text_embeds", "penultimate_hidden_states")

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]


class ClipPooledForOnnx(nn.Module):
    """``input_ids [B,L] int64 -> pooler_output [B,H]`` (``CLIPTextModel``'s pooled output, as Flux reads it)."""

    input_names = ("input_ids",)
    output_names = ("pooler_output",)

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids):
        return self.model(input_ids, output_hidden_states=False).pooler_output


class T5ForOnnx(nn.Module):
    """``input_ids [B,L] int64 -> last_hidden_state [B,L,D]``."""

    input_names = ("input_ids",)
    output_names = ("last_hidden_state",)

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids):
        return self.model(input_ids)[0]


class VaeDecoderForOnnx(nn.Module):
    """``latent [B,C,h,w] (already latents / scaling_factor + shift_factor) -> sample [B,3,H,W]`` (nominally [-1, 1], not clamped)."""

    input_names = ("latent",)
    output_names = ("sample",)

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------------------


def transformer_inputs(
    model: nn.Module, batch: int, latent_hw: tuple[int, int], text_seq_len: int, *, dtype=torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs at the export shapes, by ONNX input name (the family adapter's); timesteps float32."""
    from families import adapter_for

    return adapter_for(model).transformer_inputs(model, batch, latent_hw, text_seq_len, dtype=dtype, seed=seed)


def token_inputs(vocab_size: int, batch: int, seq_len: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab_size, (batch, seq_len), generator=g, dtype=torch.long)}  # (B, L)


def latent_inputs(channels: int, batch: int, latent_hw: tuple[int, int], *, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(batch, channels, *latent_hw, generator=g).to(dtype)}  # (B, C, h, w)


# --------------------------------------------------------------------------------------------------------
# Export and post-processing
# --------------------------------------------------------------------------------------------------------


def export_module(
    wrapper: nn.Module,
    example: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    fp32_layernorm: bool = False,
    max_batch: int = 64,
    dynamic_shapes: Callable[[Any], dict[str, dict[int, Any]]] | None = None,
) -> Path:
    """Export ``wrapper`` (one of the ``*ForOnnx`` classes) to ``path`` with a dynamic ``batch`` dimension.

    example: inputs by name, batch 2 (a batch-1 example would be specialised by ``torch.export``).
    fp32_layernorm: run every float16 ``LayerNormalization`` in float32 (fp16 exports for TensorRT).
    max_batch: upper bound of the symbolic batch dimension (a guard for ``torch.export``, not a profile).
    dynamic_shapes: given the batch ``Dim``, the dynamic axes of every input (default: the batch on axis 0
        of every input); e.g. the family adapter's spatial axes for a multi-resolution export.
    """
    import onnx

    if opset < 18:
        raise ValueError("opset must be >= 18 (dynamo exporter)")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):  # per-pass INFO chatter
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
    names = list(wrapper.input_names)
    assert list(example) == names, (list(example), names)
    batch = next(iter(example.values())).shape[0]
    if batch < 2:
        raise ValueError("export with a batch >= 2 example: torch.export specialises a size-1 batch")
    path = Path(path)
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic_shapes = dynamic_shapes(dim) if dynamic_shapes is not None else {n: {0: dim} for n in names}
    wrapper = wrapper.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            tuple(example.values()),
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=list(wrapper.output_names),
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=path.parent if path.parent.exists() else None) as tmp:
        raw = Path(tmp) / "raw.onnx"
        program.save(str(raw), external_data=True)
        del program
        _forget_onnxscript_matches()
        log_memory(f"{path.name}: torch.onnx export saved")
        # The graph is processed with its weights left in the external data file (memory stays at the size of
        # the graph, not of the weights); small models are loaded whole so graphsurgeon can fold constants.
        model = onnx.load(str(raw), load_external_data=False)
        base_dir = Path(tmp)
        if initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.load_external_data_for_model(model, tmp)
            base_dir = None
        else:
            load_small_external(model, tmp)
        fold_weight_transposes(model, base_dir=base_dir)
        name_weights_after_torch(model)
        model = cleanup(model)
        if fp32_layernorm:
            model = layernorm_to_fp32(model)
            model = cleanup(model)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        save_onnx(model, path, base_dir=base_dir)
        del model
    log.info("exported %s in %.1f s (%s)", path.name, time.perf_counter() - t0, _human(onnx_size(path)))
    log_memory(f"{path.name}: saved")
    return path


def _forget_onnxscript_matches() -> int:
    """Drop the graph that onnxscript's rewrite-rule matchers keep from their last match (onnxscript 0.7).

    The matchers are module-level singletons that store the graph, node and bindings of the last match
    (``SimplePatternMatcher._graph``, ``_match``...): after torch.onnx's optimizer ran, that keeps the whole
    exported graph alive, with its initializers (the module's weights and the transposed copies the optimizer
    folded). For an SD3-medium transformer that is ~2.4 GiB held until the next export. Returns the count.
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing to do
        return 0
    n = 0
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)
            n += 1
    gc.collect()
    return n


def load_small_external(model, base_dir: str | os.PathLike, max_bytes: int = 1 << 20) -> int:
    """Embed every externally stored initializer smaller than ``max_bytes`` (norm scales, biases) in the
    graph, so graph passes can read them; big weights stay in the file. Returns the count."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    n = 0
    for t in model.graph.initializer:
        if uses_external_data(t) and _tensor_bytes(t) < max_bytes:
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = 0  # DEFAULT: the bytes now live in raw_data
            del t.external_data[:]
            n += 1
    return n


def _tensor_bytes(t) -> int:
    return int(np.prod(t.dims)) * np.dtype(_np_dtype(t.data_type)).itemsize


def _point_external(t, location: str, offset: int, length: int) -> None:
    """Make tensor ``t`` refer to ``length`` bytes at ``offset`` of the external file ``location``."""
    import onnx

    t.ClearField("raw_data")
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def _append_external(t, data: np.ndarray, base_dir: Path, file_name: str = "extra.onnx.data") -> None:
    """Store ``data`` as the external data of tensor ``t``, appended to ``base_dir/file_name``."""
    with open(base_dir / file_name, "ab") as fh:
        offset = fh.tell()
        fh.write(np.ascontiguousarray(data).tobytes())
    _point_external(t, file_name, offset, data.nbytes)


def fold_weight_transposes(model, base_dir: str | os.PathLike | None = None) -> int:
    """Replace ``MatMul(X, Transpose(W_init))`` by ``MatMul(X, W_init^T)`` with a new initializer (in place).

    torch.onnx's optimizer normally does this already; this guarantees TensorRT sees a constant weight
    directly on the GEMM (a Transpose in between hides it from sparse-weight tactics). Returns the count.
    base_dir: where the model's external data lives, when its weights are not loaded; each weight is then
    read, transposed and appended to an external file there one at a time.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    folded = 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        tr = producers[node.input[1]]
        if tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        if len(inits[tr.input[0]].dims) != 2 or perm not in (None, [1, 0]):
            continue
        w = numpy_helper.to_array(inits[tr.input[0]], base_dir=str(base_dir) if base_dir is not None else "")
        new = numpy_helper.from_array(np.ascontiguousarray(w.T), f"{tr.input[0]}__kn{folded}")
        if base_dir is not None:
            _append_external(new, np.ascontiguousarray(w.T), Path(base_dir))
        del w
        model.graph.initializer.append(new)
        node.input[1] = new.name
        folded += 1
    return folded  # the orphaned Transpose and initializer are removed by cleanup()


def name_weights_after_torch(model) -> dict[str, str]:
    """Rename each constant MatMul/Gemm weight after the torch module it came from (in place).

    The dynamo exporter folds ``W.T`` of ``nn.Linear`` into anonymous initializers (``val_94``); its node
    metadata ``pkg.torch.onnx.name_scopes`` still names the module (``model.transformer_blocks.0.attn.to_q``).
    The new name is ``<module>.weight`` without the wrapper's first scope. Returns ``{new: old}``.
    """
    inits = {t.name: t for t in model.graph.initializer}
    taken = set(inits) | {v for n in model.graph.node for v in n.output}
    renamed: dict[str, str] = {}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        old = node.input[1]
        if uses.get(old, 0) != 1:
            continue  # shared constant: leave it
        module = _module_scope(node)
        if module is None:
            continue
        new = f"{module}.weight"
        if new == old:
            continue
        if new in taken:
            continue  # the original parameter is still used elsewhere; keep the anonymous name
        inits[old].name = new
        node.input[1] = new
        taken.add(new)
        renamed[new] = old
    return renamed


def _module_scope(node) -> str | None:
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # ['', 'model', 'model.transformer_blocks.0', ..., 'model.transformer_blocks.0.attn.to_q', 'linear_7']
    modules = [p for p in parts[:-1] if p]
    if not modules:
        return None
    name = modules[-1]
    first = modules[0]
    return name[len(first) + 1 :] if name.startswith(first + ".") else name


def cleanup(model):
    """Constant folding, dead-node removal and topological sort with onnx-graphsurgeon (returns a new model)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    if initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        # graphsurgeon folds through an in-memory ONNX Runtime session, which protobuf limits to 2 GB; bigger
        # models rely on the folding torch.onnx's optimizer already did (it also folds weight transposes).
        graph.fold_constants(fold_shapes=True, partitioning=None, error_ok=True)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    # graphsurgeon keeps opset imports; restore model-level metadata it drops
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def layernorm_to_fp32(model):
    """Compute every float16 ``LayerNormalization`` in float32: Cast(x)->LN(fp32 scale/bias)->Cast back."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    n = 0
    fp32_constants: dict[int, Any] = {}  # one float32 copy per shared scale/bias constant
    for node in list(graph.nodes):
        if node.op == "LayerNormalization" and node.inputs[0].dtype == np.float16:
            x, y = node.inputs[0], node.outputs[0]
            x32 = gs.Variable(f"{node.name}_in_fp32", dtype=np.float32)
            y32 = gs.Variable(f"{node.name}_out_fp32", dtype=np.float32)
            graph.nodes.append(gs.Node("Cast", f"{node.name}_cast_in", attrs={"to": int(1)}, inputs=[x], outputs=[x32]))
            new_inputs = [x32]
            for p in node.inputs[1:]:
                if isinstance(p, gs.Constant):
                    if id(p) not in fp32_constants:
                        fp32_constants[id(p)] = gs.Constant(f"{p.name}_fp32", p.values.astype(np.float32))
                    new_inputs.append(fp32_constants[id(p)])
                else:
                    p32 = gs.Variable(f"{p.name}_fp32_{node.name}", dtype=np.float32)
                    graph.nodes.append(gs.Node("Cast", f"{node.name}_cast_{p.name}", attrs={"to": int(1)}, inputs=[p], outputs=[p32]))
                    new_inputs.append(p32)
            node.inputs = new_inputs
            node.outputs = [y32]
            graph.nodes.append(gs.Node("Cast", f"{node.name}_cast_out", attrs={"to": int(10)}, inputs=[y32], outputs=[y]))
            n += 1
    graph.cleanup().toposort()
    log.debug("layernorm_to_fp32: %d LayerNormalization nodes now run in float32", n)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    return out


def initializer_bytes(model) -> int:
    from onnx.external_data_helper import uses_external_data

    total = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            total += _tensor_bytes(t)
        else:
            total += len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * 4
    return total


def _np_dtype(elem_type: int):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def save_onnx(model, path: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> Path:
    """Check and save ``model`` atomically; weights go to ``<name>.data`` beside it when over 2 GB.

    ``path`` and its data file are written in a temporary directory and renamed into place, data first.
    base_dir: where ``model``'s not-loaded external data lives; its tensors are then copied into the new data
    file one at a time (page-aligned), so saving never holds the weights in memory.
    """
    import onnx

    path = Path(path)
    streaming = base_dir is not None and _has_external(model)
    external = streaming or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        if streaming:
            _copy_external_data(model, Path(base_dir), Path(tmp) / data_name)
            onnx.save_model(model, str(tmp_path))
        elif external:
            onnx.save_model(model, str(tmp_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_path))
        onnx.checker.check_model(str(tmp_path))
        if external:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            (path.parent / data_name).unlink()
        os.replace(tmp_path, path)
    return path


def _has_external(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in model.graph.initializer)


def _copy_external_data(model, base_dir: Path, data_file: Path, align: int = 4096, chunk: int = 64 << 20) -> None:
    """Copy every external tensor of ``model`` from its file under ``base_dir`` into ``data_file`` (in graph
    order, each at a page-aligned offset) and point the tensor there. Streams at most ``chunk`` bytes at once."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    handles: dict[str, Any] = {}
    try:
        with open(data_file, "wb") as out:
            for t in model.graph.initializer:
                if not uses_external_data(t):
                    continue
                info = ExternalDataInfo(t)
                src = handles.get(info.location) or handles.setdefault(info.location, open(base_dir / info.location, "rb"))
                length = info.length if info.length else _tensor_bytes(t)
                pad = (-out.tell()) % align
                out.write(b"\0" * pad)
                offset = out.tell()
                src.seek(info.offset or 0)
                left = length
                while left:
                    block = src.read(min(chunk, left))
                    if not block:
                        raise RuntimeError(f"external data of {t.name} is truncated in {info.location}")
                    out.write(block)
                    left -= len(block)
                _point_external(t, data_file.name, offset, length)
    finally:
        for h in handles.values():
            h.close()


def onnx_size(path: str | os.PathLike) -> int:
    """Bytes of the ONNX file plus its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------------------------------------
# Checks on the exported graph
# --------------------------------------------------------------------------------------------------------


def linear_weight_layout(model) -> dict[str, dict[str, Any]]:
    """For every MatMul/Gemm whose weight (input B) is a constant initializer: ``{init name: {node, op, k_axis, shape}}``.

    MatMul ``Y = X @ W`` with ``W`` ``[K, N]`` -> K is axis 0; Gemm with ``transB=1`` -> ``W`` is ``[N, K]``, axis 1.
    """
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if len(t.dims) != 2:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
        out[t.name] = {"node": node.name, "op": node.op_type, "k_axis": 1 if trans_b else 0, "shape": list(t.dims)}
    return out


def missing_linear_weights(model, torch_module: nn.Module, prefix: str | tuple[str, ...] | None = None) -> list[str]:
    """Names of ``nn.Linear`` layers under ``prefix`` (default: the family's block lists) with no MatMul/Gemm
    constant weight of that name in ``model``.

    Empty means every such linear became a GEMM with a constant initializer (sparse tactics are eligible).
    """
    if prefix is None:
        from families import adapter_for

        prefix = tuple(f"{a}." for a in adapter_for(torch_module).block_lists)
    have = set(linear_weight_layout(model))
    want = [f"{n}.weight" for n, m in torch_module.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]
    return [w for w in want if w not in have]


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime parity
# --------------------------------------------------------------------------------------------------------


def ort_session(path: str | os.PathLike, *, threads: int | None = None, optimize: bool = True):
    """A CPU ``InferenceSession`` that does not spin idle threads (the machine is shared).

    optimize: ONNX Runtime's graph optimisations (default on; off runs the graph exactly as exported).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (error relative to the output's scale, float64)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(a - ref).max() / scale)


@dataclass
class Parity:
    """Result of comparing an ONNX model with its torch reference on random inputs."""

    batch_errors: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> output -> rel. error
    tolerance: float = 1e-4
    reference: str = "torch fp32"

    @property
    def max_error(self) -> float:
        return max((e for d in self.batch_errors.values() for e in d.values()), default=0.0)

    @property
    def ok(self) -> bool:
        return all(np.isfinite(e) and e <= self.tolerance for d in self.batch_errors.values() for e in d.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "tolerance": self.tolerance,
            "max_rel_error": self.max_error,
            "ok": self.ok,
            "per_batch": {str(b): d for b, d in self.batch_errors.items()},
        }


def check_parity(
    path: str | os.PathLike,
    reference: Callable[[dict[str, torch.Tensor]], Sequence[torch.Tensor]],
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    output_names: Sequence[str],
    *,
    batches: Sequence[int] = (1, 3),
    tolerance: float = 1e-4,
    reference_name: str = "torch fp32",
    session=None,
) -> Parity:
    """Run ``path`` in ONNX Runtime (CPU) and ``reference`` on the same inputs at each batch size.

    make_inputs(batch) gives the ONNX inputs (numpy-convertible tensors, in the ONNX dtypes);
    reference(inputs) returns the outputs in ``output_names`` order. Error: :func:`rel_error`.
    """
    sess = session or ort_session(path)
    result = Parity(tolerance=tolerance, reference=reference_name)
    for b in batches:
        inputs = make_inputs(b)
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        got = sess.run(list(output_names), feeds)
        with torch.no_grad():
            ref = reference(inputs)
        result.batch_errors[b] = {name: rel_error(g, r.detach().float().cpu().numpy()) for name, g, r in zip(output_names, got, ref)}
        for name, g in zip(output_names, got):
            assert g.shape[0] == b, f"{name}: ONNX returned batch {g.shape[0]} for input batch {b}"
    return result


# --------------------------------------------------------------------------------------------------------
# Per-component export + parity (what `python -m pipeline export` calls)
# --------------------------------------------------------------------------------------------------------

FP32_TOLERANCE = 1e-4
# float16 ONNX vs the float32 torch model, relative to the output's scale: fp16's unit roundoff is
# 2^-11 ~ 4.9e-4 per rounding of weights and activations; it compounds over blocks. 1e-2 is ~20 roundoffs,
# i.e. loose enough for a 24-block SD3 (tiny-sd3 measures ~5e-4) yet tight enough to catch a real error
# (a wrong cast, an overflow to inf, or a dropped layer-norm each give errors >= 5e-2).
FP16_TOLERANCE = 1e-2


def parity_tolerance(precision: str) -> float:
    return FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE


def _io_spec(path: str | os.PathLike) -> tuple[dict, dict]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def spec(vs):
        out = {}
        for v in vs:
            tt = v.type.tensor_type
            out[v.name] = {
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tt.shape.dim],
            }
        return out

    return spec(m.graph.input), spec(m.graph.output)


@contextlib.contextmanager
def fp32_compute(module: nn.Module) -> Iterator[nn.Module]:
    """Run a float16 (or bfloat16) ``module`` with float32 arithmetic, one layer's weights at a time.

    Every submodule that owns parameters is cast to float32 just before it runs and back right after (the
    round trip is exact), and floating inputs are upcast: the float32 reference of a half-precision export
    without a float32 copy of the whole model. A float32 module runs unchanged.
    """
    low = {p.dtype for p in module.parameters()} & {torch.float16, torch.bfloat16}
    if not low:
        yield module
        return
    (original,) = low

    def before(m, args, kwargs):
        m.to(torch.float32)
        up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def after(m, _args, _out):
        m.to(original)

    handles = []
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after))
    try:
        yield module
    finally:
        for h in handles:
            h.remove()
        module.to(original)


def release_weights(module: nn.Module) -> None:
    """Free the memory of ``module``'s parameters and buffers now (they become empty tensors).

    Deleting an exported module is not enough: onnxscript's rewrite rules keep the last graph they matched,
    whose initializers still reference the module's tensors, so a 2B-parameter transformer would stay in
    memory through the ONNX Runtime parity check. Only for modules the caller has given up.
    """
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)


@dataclass
class ParityReference:
    """Torch outputs at each parity batch, computed before the export so that the torch module can be freed
    before ONNX Runtime loads the exported model (the two never share memory); :meth:`check` runs ORT."""

    path: Path
    output_names: list[str]
    feeds: dict[str, dict[str, np.ndarray]]  # by case label: the batch ("3"), or batch@latent shape ("1@4x8")
    outputs: dict[str, list[np.ndarray]]
    tolerance: float
    reference: str

    def check(self, name: str = "") -> Parity:
        # ONNX Runtime's CPU kernels are float32: for a half-precision model it inserts Casts, and its constant
        # folding would turn them into a float32 copy of every weight (measured: 8.3 GiB of session memory for
        # a 3.9 GiB float16 SD3-medium transformer, 0.04 GiB without). The graph is checked as exported.
        half = any(spec["dtype"] in ("float16", "bfloat16") for spec in _io_spec(self.path)[0].values())
        sess = ort_session(self.path, optimize=not half)
        result = Parity(tolerance=self.tolerance, reference=self.reference)
        for case, feeds in self.feeds.items():
            got = sess.run(self.output_names, feeds)
            result.batch_errors[case] = {n: rel_error(g, r) for n, g, r in zip(self.output_names, got, self.outputs[case])}
            b = int(case.split("@")[0])
            for n, g in zip(self.output_names, got):
                assert g.shape[0] == b, f"{n}: ONNX returned batch {g.shape[0]} for input batch {b}"
        del sess
        log.info("%s: ORT vs %s max rel. error %.2e (tolerance %.0e, batches %s)", name or self.path.name, self.reference,
                 result.max_error, result.tolerance, list(self.feeds))
        log_memory(f"{self.path.name}: parity checked")
        return result


def export_component(
    name: str,
    wrapper: nn.Module,
    make_inputs: Callable[[int, torch.dtype], dict[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    precision: str = "fp32",
    parity_batches: Sequence[int] = (1, 3),
    keep_fp32: bool = False,
    in_place: bool = False,
    dynamic_shapes: Callable[[Any], dict[str, dict[int, Any]]] | None = None,
    parity_shapes: Sequence[tuple[int, int]] = (),
) -> tuple[dict[str, Any], ParityReference | None]:
    """Export one component; returns its summary and the torch side of the parity check (run it with
    :meth:`ParityReference.check` once the torch module is no longer needed, to bound memory).

    make_inputs(batch, dtype): inputs by ONNX input name; float tensors in ``dtype`` except the transformer's
        ``timestep`` (always float32).
    precision: ``fp32`` | ``fp16``; keep_fp32 exports this component in float32 even for ``fp16``.
    in_place: convert ``wrapper`` to the export dtype in place instead of exporting a converted copy (the
        caller gives the module up; at scale a copy would double the memory).
    parity_batches: batch sizes to compare at (empty: no parity check); tolerance :func:`parity_tolerance`.
        The reference is the torch module in float32 arithmetic (:func:`fp32_compute` for half weights).
    dynamic_shapes: the dynamic axes (see :func:`export_module`); default the batch only.
    parity_shapes: further latent shapes ``(h, w)`` to compare at, at batch 1 (a multi-resolution export);
        ``make_inputs`` then takes them as a third argument.
    """
    import copy

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    eff = "fp32" if keep_fp32 else precision
    dtype = torch_dtype(eff)
    current = next(wrapper.parameters()).dtype
    exported = wrapper if current == dtype or in_place else copy.deepcopy(wrapper)
    exported.to(dtype)
    ref = None
    if parity_batches:
        feeds: dict[str, dict[str, np.ndarray]] = {}
        outputs: dict[str, list[np.ndarray]] = {}
        cases = [(str(b), (b,)) for b in parity_batches] + [(f"1@{h}x{w}", (1, (h, w))) for h, w in parity_shapes]
        # ``wrapper`` is the reference: the float32 original when a converted copy is exported, or, converted
        # in place, its own half weights in float32 arithmetic (the same weights the ONNX holds).
        with torch.no_grad(), fp32_compute(wrapper) as m:
            for case, args in cases:
                inputs = make_inputs(args[0], dtype, *args[1:])
                out = m(*[v.float() if v.is_floating_point() else v for v in inputs.values()])
                outputs[case] = [o.detach().float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]
                feeds[case] = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        ref_name = "torch fp32" if (eff == "fp32" or exported is not wrapper) else f"torch {eff} weights, fp32 arithmetic"
        ref = ParityReference(Path(path), list(wrapper.output_names), feeds, outputs, parity_tolerance(eff), ref_name)
    t0 = time.perf_counter()
    export_module(exported, make_inputs(2, dtype), path, fp32_layernorm=(eff == "fp16"), dynamic_shapes=dynamic_shapes)
    seconds = time.perf_counter() - t0
    if in_place or exported is not wrapper:
        release_weights(exported)
    del exported
    summary: dict[str, Any] = {"file": Path(path).name, "bytes": onnx_size(path), "precision": eff, "export_s": round(seconds, 1)}
    summary["inputs"], summary["outputs"] = _io_spec(path)
    return summary, ref


def export_and_check(
    name: str,
    wrapper: nn.Module,
    make_inputs: Callable[[int, torch.dtype], dict[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    precision: str = "fp32",
    parity_batches: Sequence[int] = (1, 3),
    keep_fp32: bool = False,
    dynamic_shapes: Callable[[Any], dict[str, dict[int, Any]]] | None = None,
    parity_shapes: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """:func:`export_component` (on a converted copy) followed at once by its parity check.

    Returns a JSON-ready summary: file, bytes, dtype, I/O, export seconds, parity.
    """
    summary, ref = export_component(name, wrapper, make_inputs, path, precision=precision, parity_batches=parity_batches, keep_fp32=keep_fp32,
                                    dynamic_shapes=dynamic_shapes, parity_shapes=parity_shapes)
    if ref is not None:
        summary["parity"] = ref.check(name).to_dict()
    return summary


def transformer_component(model: nn.Module, *, latent_hw: tuple[int, int], text_seq_len: int):
    """``(wrapper, make_inputs)`` of a transformer of any family (dense or compact) for :func:`export_component`."""
    from families import adapter_for

    adapter = adapter_for(model)

    def make(batch, dtype, hw=None):
        return adapter.transformer_inputs(model, batch, hw or latent_hw, text_seq_len, dtype=dtype, seed=batch)

    return adapter.transformer_for_onnx(model.eval()), make


def transformer_dynamic_shapes(model: nn.Module, latent_min: tuple[int, int], latent_max: tuple[int, int]):
    """For :func:`export_component`: the family adapter's dynamic axes over latents ``latent_min..latent_max``
    (None when they are equal: a one-resolution export keeps static spatial dims, as TensorRT likes best)."""
    if tuple(latent_min) == tuple(latent_max):
        return None
    from families import adapter_for

    adapter = adapter_for(model)
    return lambda batch: adapter.transformer_dynamic_shapes(model, batch, latent_min, latent_max)


def vae_dynamic_shapes(latent_min: tuple[int, int], latent_max: tuple[int, int]):
    """For :func:`export_component`: the VAE decoder's latent height and width over ``latent_min..latent_max``."""
    if tuple(latent_min) == tuple(latent_max):
        return None
    h = torch.export.Dim("latent_h", min=max(1, latent_min[0]), max=max(2, latent_max[0]))
    w = torch.export.Dim("latent_w", min=max(1, latent_min[1]), max=max(2, latent_max[1]))
    return lambda batch: {"latent": {0: batch, 2: h, 3: w}}


def clip_component(encoder: nn.Module, *, seq_len: int, pooled: bool = False):
    """``(wrapper, make_inputs)`` of a ``CLIPTextModelWithProjection`` (SD3's text_encoder / text_encoder_2),
    or with ``pooled`` of a ``CLIPTextModel`` read for its pooled output (Flux's text_encoder)."""
    vocab = int(encoder.config.vocab_size)
    wrapper = ClipPooledForOnnx(encoder.eval()) if pooled else ClipForOnnx(encoder.eval())
    return wrapper, lambda b, dt: token_inputs(vocab, b, seq_len, seed=b)


def t5_component(encoder: nn.Module, *, seq_len: int):
    """``(wrapper, make_inputs)`` of a ``T5EncoderModel`` (text_encoder_3)."""
    vocab = int(encoder.config.vocab_size)
    return T5ForOnnx(encoder.eval()), lambda b, dt: token_inputs(vocab, b, seq_len, seed=b)


def vae_decoder_component(vae: nn.Module, *, latent_hw: tuple[int, int]):
    """``(wrapper, make_inputs)`` of ``AutoencoderKL.decode`` (input already ``latents / scaling_factor + shift_factor``)."""
    channels = int(vae.config.latent_channels)
    return VaeDecoderForOnnx(vae.eval()), lambda b, dt, hw=None: latent_inputs(channels, b, hw or latent_hw, dtype=dt, seed=b)


def export_transformer(
    model: nn.Module, path, *, latent_hw: tuple[int, int], text_seq_len: int, precision: str = "fp32", parity_batches=(1, 3)
) -> dict[str, Any]:
    """Export a transformer of any family (dense or compact) to ``path``; see :func:`export_and_check`."""
    wrapper, make = transformer_component(model, latent_hw=latent_hw, text_seq_len=text_seq_len)
    return export_and_check("transformer", wrapper, make, path, precision=precision, parity_batches=parity_batches)


def export_clip(
    encoder: nn.Module, path, *, seq_len: int, precision: str = "fp32", parity_batches=(1, 3), name: str = "text_encoder"
) -> dict[str, Any]:
    """Export a ``CLIPTextModelWithProjection`` (text_encoder / text_encoder_2)."""
    wrapper, make = clip_component(encoder, seq_len=seq_len)
    return export_and_check(name, wrapper, make, path, precision=precision, parity_batches=parity_batches)


def export_t5(encoder: nn.Module, path, *, seq_len: int, precision: str = "fp32", parity_batches=(1, 3), keep_fp32: bool = True) -> dict[str, Any]:
    """Export a ``T5EncoderModel`` (text_encoder_3). Kept float32 by default: T5 activations overflow float16."""
    wrapper, make = t5_component(encoder, seq_len=seq_len)
    return export_and_check("text_encoder_3", wrapper, make, path, precision=precision, parity_batches=parity_batches, keep_fp32=keep_fp32)


def export_vae_decoder(vae: nn.Module, path, *, latent_hw: tuple[int, int], precision: str = "fp32", parity_batches=(1, 3)) -> dict[str, Any]:
    """Export ``AutoencoderKL.decode`` (input already unscaled: ``latents / scaling_factor + shift_factor``)."""
    wrapper, make = vae_decoder_component(vae, latent_hw=latent_hw)
    return export_and_check("vae_decoder", wrapper, make, path, precision=precision, parity_batches=parity_batches)
