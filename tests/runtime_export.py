"""Test-side ONNX export of pipeline components with stage 2's I/O names (used until/unless
``export.onnx_export`` is importable; then its exporter is used instead).

Every export uses ``torch.onnx.export(dynamo=True, opset 18)`` with a batch-2 example and a dynamic
``batch`` dim, as stage 2 does.
"""

from __future__ import annotations

from pathlib import Path

import torch

OPSET = 18


def prune_2_4_(module: torch.nn.Module) -> int:
    """Zero the 2 smallest of every 4 consecutive input weights of each ``nn.Linear`` (in place); returns count."""
    n = 0
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.Linear) and mod.in_features % 4 == 0:
                w = mod.weight  # (out, in)
                groups = w.abs().reshape(w.shape[0], -1, 4)  # (out, in/4, 4)
                drop = groups.topk(2, dim=-1, largest=False).indices
                mask = torch.ones_like(groups).scatter_(-1, drop, 0.0)
                w.mul_(mask.reshape_as(w))
                n += 1
    return n


class _Transformer(torch.nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.t(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class _Clip(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        o = self.m(input_ids, output_hidden_states=True)
        return o.text_embeds, o.hidden_states[-2]


class _T5(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], dynamo: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not dynamo:  # T5's attention reshape does not trace with a symbolic batch under torch.export
        axes = {n: {0: "batch"} for n in inputs + outputs}
        torch.onnx.export(module.eval(), tuple(args), str(path), dynamo=False, opset_version=OPSET, input_names=inputs, output_names=outputs, dynamic_axes=axes)
        return path
    batch = torch.export.Dim("batch", min=1, max=64)
    dyn = {name: {0: batch} for name in inputs}
    prog = torch.onnx.export(module.eval(), tuple(args), dynamo=True, opset_version=OPSET, input_names=inputs, output_names=outputs, dynamic_shapes=dyn, verbose=False)
    prog.save(str(path))
    return path


def export_transformer(transformer, path: Path, text_len: int, dtype=torch.float32) -> Path:
    """``transformer.onnx`` with stage 2's names; ``dtype=torch.float16`` gives the TensorRT precision."""
    cfg = transformer.config
    t = transformer.to(dtype)
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dtype),  # (B, C, h, w)
        torch.randn(2, text_len, cfg.joint_attention_dim, generator=g).to(dtype),  # (B, S, D)
        torch.randn(2, cfg.pooled_projection_dim, generator=g).to(dtype),  # (B, P)
        (torch.rand(2, generator=g) * 1000).to(dtype),  # (B,)
    )
    return _export(_Transformer(t), args, path, ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"], ["sample"])


def export_pipeline(pipe, onnx_dir: Path, spec, components=("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder")) -> Path:
    """Export the named components of an SD3 pipeline into ``onnx_dir/<name>.onnx`` (float32)."""
    onnx_dir = Path(onnx_dir)
    clip_len = pipe.tokenizer.model_max_length
    for name in components:
        path = onnx_dir / f"{name}.onnx"
        if name == "transformer":
            export_transformer(pipe.transformer, path, spec.shapes.text_seq_len)
        elif name in ("text_encoder", "text_encoder_2"):
            ids = torch.randint(0, getattr(pipe, name).config.vocab_size, (2, clip_len))
            _export(_Clip(getattr(pipe, name)), (ids,), path, ["input_ids"], ["text_embeds", "penultimate_hidden_states"])
        elif name == "text_encoder_3":
            ids = torch.randint(0, pipe.text_encoder_3.config.vocab_size, (2, spec.max_sequence_length))
            _export(_T5(pipe.text_encoder_3), (ids,), path, ["input_ids"], ["last_hidden_state"], dynamo=False)
        elif name == "vae_decoder":
            c = pipe.vae.config.latent_channels
            lat = torch.randn(2, c, spec.shapes.latent_height, spec.shapes.latent_width)
            _export(_VaeDecoder(pipe.vae), (lat,), path, ["latent"], ["sample"])
    return onnx_dir
