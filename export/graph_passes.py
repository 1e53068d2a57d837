"""Graph passes over exported ONNX models (in place unless they say otherwise), for the float exporter
(:mod:`export.dynamo_export`) and the Q/DQ exporter (:mod:`export.qdq_export`): weight-transpose folding,
naming weights after the torch parameters, constant folding and clean-up with onnx-graphsurgeon,
float32 layer norms, folding weight quantizers into INT8/FP8 constants, dead-node removal."""

from __future__ import annotations

import ast
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from export.onnx_files import EXTERNAL_DATA_THRESHOLD, append_external, initializer_bytes
from export.sparsity_check import quantize_fp8, quantize_int  # the ONNX / TensorRT quantize of a constant

log = logging.getLogger(__name__)

Q_OPS = ("QuantizeLinear", "TRT_FP8QuantizeLinear")
DQ_OPS = ("DequantizeLinear", "TRT_FP8DequantizeLinear")


def _consumers(model) -> dict[str, list]:
    """``{tensor name: nodes that read it}``."""
    consumers: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].append(node)
    return consumers


def _transposed_matmul_weights(model, producers):
    """``(MatMul, Transpose)`` for every MatMul whose second input comes from a Transpose, in graph order."""
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in producers and producers[node.input[1]].op_type == "Transpose":
            yield node, producers[node.input[1]]


# --------------------------------------------------------------------------------------------------------
# Float graphs (torch.onnx's dynamo exporter)
# --------------------------------------------------------------------------------------------------------


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
    for node, tr in _transposed_matmul_weights(model, producers):
        if tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        if len(inits[tr.input[0]].dims) != 2 or perm not in (None, [1, 0]):
            continue
        w = numpy_helper.to_array(inits[tr.input[0]], base_dir=str(base_dir) if base_dir is not None else "")
        new = numpy_helper.from_array(np.ascontiguousarray(w.T), f"{tr.input[0]}__kn{folded}")
        if base_dir is not None:
            append_external(new, np.ascontiguousarray(w.T), Path(base_dir))
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


# --------------------------------------------------------------------------------------------------------
# Quantized graphs (Q/DQ from the TorchScript exporter)
# --------------------------------------------------------------------------------------------------------


def _attr(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set_attr_int(node, name: str, value: int) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, int(value)))


def constant_values(model) -> dict[str, np.ndarray]:
    """Values of the small constants of ``model``: embedded initializers and ``Constant`` nodes (scales, zero
    points), by tensor name. Externally stored initializers are skipped."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            a = next((a for a in node.attribute if a.name == "value"), None)
            if a is not None:
                out[node.output[0]] = numpy_helper.to_array(a.t)
    for t in model.graph.initializer:
        if not uses_external_data(t) and int(np.prod(t.dims)) <= 1 << 16:
            out[t.name] = numpy_helper.to_array(t)
    return out


def fold_weight_quantizers(model) -> int:
    """Replace every ``Q(float constant W) -> DQ`` by ``DQ(quantized constant)`` (in place); returns the count.

    INT8 (``QuantizeLinear``): the constant becomes ``int8`` (or the zero point's type); FP8
    (``TRT_FP8QuantizeLinear``): ``FLOAT8E4M3FN``. The constant keeps W's name; a W used by anything else, or a Q
    not followed by exactly one DQ, is left alone.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = constant_values(model)
    consumers = _consumers(model)
    drop = []
    for q in model.graph.node:
        if q.op_type not in Q_OPS or q.input[0] not in inits or len(consumers[q.input[0]]) != 1:
            continue
        users = consumers[q.output[0]]
        if len(users) != 1 or users[0].op_type not in DQ_OPS or q.input[1] not in consts:
            continue
        w = numpy_helper.to_array(inits[q.input[0]])
        scale = consts[q.input[1]]
        if q.op_type == "QuantizeLinear":
            zp_name = q.input[2] if len(q.input) > 2 and q.input[2] else None
            if zp_name is not None and zp_name not in consts:
                continue
            data = quantize_int(w, scale, consts[zp_name] if zp_name else None, _attr(q, "axis", 1))
        else:
            data = quantize_fp8(w, scale, _attr(q, "axis", 1))
        inits[q.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(data), q.input[0]))
        users[0].input[0] = q.input[0]
        drop.append(q)
    for q in drop:
        model.graph.node.remove(q)
    return len(drop)


def fold_dq_transposes(model) -> int:
    """``MatMul(X, Transpose(DQ(C)))`` -> ``MatMul(X, DQ(C^T))`` for a 2-D quantized constant ``C`` (in place).

    The weight then reaches its GEMM straight from its DequantizeLinear, K along axis 0, as TensorRT's sparse
    and quantized GEMM tactics expect; a per-channel DQ's axis follows the transpose. Returns the count.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = _consumers(model)
    drop = []
    for mm, tr in _transposed_matmul_weights(model, producers):
        if tr.input[0] not in producers:
            continue
        dq = producers[tr.input[0]]
        if dq.op_type not in DQ_OPS or dq.input[0] not in inits:
            continue
        const = inits[dq.input[0]]
        perm = _attr(tr, "perm")
        if len(const.dims) != 2 or (perm is not None and list(perm) != [1, 0]):
            continue
        if len(consumers[tr.output[0]]) != 1 or len(consumers[dq.output[0]]) != 1 or len(consumers[dq.input[0]]) != 1:
            continue
        scale_shape = _shape_of(model, dq.input[1])
        if scale_shape is None:
            continue
        if int(np.prod(scale_shape)) > 1:  # per channel: the axis moves with the transpose
            _set_attr_int(dq, "axis", 1 - (_attr(dq, "axis", 1) % 2))
        c = numpy_helper.to_array(const)
        const.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(c.T), const.name))
        mm.input[1] = dq.output[0]
        drop.append(tr)
    stale = {o for n in drop for o in n.output} | {producers[n.input[0]].output[0] for n in drop}
    keep = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for tr in drop:
        model.graph.node.remove(tr)
    return len(drop)


def _shape_of(model, name: str) -> list[int] | None:
    for t in model.graph.initializer:
        if t.name == name:
            return list(t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            a = next((a for a in node.attribute if a.name == "value"), None)
            return list(a.t.dims) if a is not None else None
    return None


def name_initializers_after_torch(model, prefix: str) -> dict[str, str]:
    """Name the initializers after the torch parameters (in place); returns ``{new: old}``.

    The TorchScript exporter names a parameter after the wrapper's attribute path (``model.proj_out.bias``): the
    wrapper's ``prefix`` is dropped. A GEMM weight it folded into an anonymous constant (``onnx::MatMul_1374``,
    a transposed float weight) is named after its node's scope (``/model/proj_out/MatMul`` -> ``proj_out.weight``).
    """
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    uses: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for i in node.input:
            uses[i] += 1
    renames: dict[str, str] = {}
    for t in model.graph.initializer:
        if t.name.startswith(prefix + ".") and t.name[len(prefix) + 1 :] not in taken:
            renames[t.name] = t.name[len(prefix) + 1 :]
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        old = node.input[1]
        if old in renames or not old.startswith("onnx::") or uses[old] != 1:
            continue
        parts = [p for p in node.name.split("/") if p]
        if len(parts) < 3 or parts[0] != prefix:
            continue
        new = ".".join(parts[1:-1]) + ".weight"
        if new not in taken and new not in renames.values():
            renames[old] = new
    for t in model.graph.initializer:
        if t.name in renames:
            t.name = renames[t.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for v in list(model.graph.input) + list(model.graph.value_info):
        if v.name in renames:
            v.name = renames[v.name]
    return {new: old for old, new in renames.items()}


def fold_shape_computations(model):
    """Constant folding with onnx-graphsurgeon (ONNX Runtime evaluates the foldable subgraphs), Q/DQ excluded,
    then dead-node removal and a topological sort; returns a new model.

    The TorchScript exporter leaves ``Shape -> Gather -> Div -> Slice`` chains (``chunk`` of a static dim) that
    ONNX shape inference cannot follow; folded, every GEMM's shape is inferable (FLOPs in the sparsity report) and
    TensorRT gets a simpler graph. Weights are untouched: a (de)quantize node is never folded, nor what reads it.
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(fold_shapes=True, partitioning="basic", error_ok=True, should_exclude_node=lambda n: n.op in Q_OPS + DQ_OPS)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    return out


def remove_unused(model) -> int:
    """Drop nodes whose outputs nothing reads (not graph outputs) and unused initializers; returns the count."""
    outputs = {o.name for o in model.graph.output}
    removed = 0
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
        removed += len(dead)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    removed += len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return removed
