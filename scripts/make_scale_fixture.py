"""Build a random-weight diffusers pipeline with a real model's shapes, offline, for scale tests.

Hub weights cannot be downloaded here, but memory and time depend on shapes, not values: this writes a
``StableDiffusion3Pipeline`` directory whose transformer and VAE have the real configs of the chosen family
(``sd3-medium``: 24 blocks, 24 heads of 64, 2.0B parameters) with seeded random weights, and small text
encoders of the real output widths (CLIP-L 768, CLIP-G 1280, T5 4096, so the transformer sees real
``encoder_hidden_states`` shapes: 77 CLIP + 256 T5 tokens), reusing tiny-sd3's offline tokenizers. With
``--encoders published`` the text encoders are the published ones' sizes instead (CLIP-L 124M, CLIP-G 695M,
T5-XXL 4.76B parameters with its 24 layers; ``families.components``): the whole pipeline at its real weight
bytes, for checking computed sizes against real files (``docs/scale.md``, "Real sizes").

    python scripts/make_scale_fixture.py --family sd3-medium --out artifacts/fixtures/sd3-medium
    python scripts/make_scale_fixture.py --family sd3-medium --encoders published --out artifacts/fixtures/sd3-medium-full

Options: ``--sample-size`` sets the transformer's default latent size (the default image size is 8x that;
the real model says 128, i.e. 1024 px; the scale check uses 32, i.e. 256 px, to keep CPU runs short; the
position embedding still covers the real maximum), ``--t5-layers`` the depth of the T5 encoder (the real
T5-XXL has 24 layers, 4.7B parameters; each layer here is one of its real width), ``--blocks`` keeps only that
many transformer blocks of the real width (a few-block model for per-call checks). Weights are stored in
float16, as on the hub. No float32 copy of a large component is ever held: the transformer and the CLIP
encoders are built in float16, and T5 is built on the ``meta`` device and written tensor by tensor into
safetensors shards of at most 2 GB (the peak is one shard, whatever its depth). Another family is one entry of
:data:`FAMILIES`.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.io import atomic_path, write_json  # noqa: E402
from common.paths import REPO_ROOT  # noqa: E402
from families import get_adapter  # noqa: E402
from families.components import T5_XXL  # noqa: E402

log = logging.getLogger("make_scale_fixture")

# Transformer and VAE configs as published with the hub checkpoints, from the SD3 family adapter.
sd3 = get_adapter("sd3")
FAMILIES = sd3.published_configs
SD3_VAE = sd3.published_vae_config
CLIP_LEN = 77
TOKENIZERS = REPO_ROOT / "models" / "tiny-sd3"
ENCODERS = ("small", "published")
SHARD_BYTES = 2 * 10**9  # as save_pretrained(max_shard_size="2GB")


def _randomise_zero_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    """diffusers zero-initialises AdaLN modulations and output projections; a random model that
    calibrates and prunes like a trained one needs them non-zero."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02).to(p.dtype))


def _random_like(key: str, t: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Random values for the tensor ``key`` of shape ``t.shape``: norm scales 1, other vectors 0, matrices
    N(0, 1/fan_in) so that activations keep their scale through many layers. Generated a row block at a time
    in float32 and cast, so no float32 copy of the whole tensor exists."""
    if t.dim() < 2:
        return torch.ones(t.shape, dtype=dtype) if "norm" in key else torch.zeros(t.shape, dtype=dtype)
    fan_in = t[0].numel()
    out = torch.empty(t.shape, dtype=dtype)
    step = max(1, (1 << 24) // fan_in)  # rows per 16M-value block
    for r in range(0, t.shape[0], step):
        out[r:r + step] = torch.randn(out[r:r + step].shape, generator=generator).mul_(fan_in ** -0.5).to(dtype)
    return out


def write_streamed(module: torch.nn.Module, out: Path, generator: torch.Generator, *, dtype=torch.float16,
                   shard_bytes: int = SHARD_BYTES) -> int:
    """Write ``module`` (built on the ``meta`` device) as a transformers directory: its config and random
    weights in ``dtype``, in safetensors shards of at most ``shard_bytes`` with ``model.safetensors.index.json``,
    each tensor materialised only while its shard is written (a tied tensor once, under its first name).
    Returns the weight bytes written."""
    from safetensors.torch import save_file

    from families.pipeline_sizes import state_tensors

    out.mkdir(parents=True)
    module.config.save_pretrained(out)
    entries = state_tensors(module)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in entries:
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: _random_like(key, t, generator, dtype) for key, t in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def build(family: str, out: Path, *, sample_size: int, t5_layers: int, seed: int, blocks: int | None = None,
          encoders: str = "small") -> dict:
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from families.registry import quiet_libraries

    quiet_libraries()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clip_tok = CLIPTokenizer.from_pretrained(TOKENIZERS / "tokenizer")
    clip_tok.model_max_length = CLIP_LEN
    t5_tok = T5Tokenizer.from_pretrained(TOKENIZERS / "tokenizer_3")
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)

    def clip(attr: str, hidden: int, heads: int):
        if published:  # the published sizes (vocabularies too); the tokenizers' ids stay within them
            return CLIPTextModelWithProjection(CLIPTextConfig(**published[attr]))
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2, num_attention_heads=heads,
            max_position_embeddings=CLIP_LEN, projection_dim=hidden, hidden_act="gelu", **ids))

    published = {attr: config for attr, (_, config) in sd3.published_text_encoders.items()} if encoders == "published" else {}
    t5_config = T5Config(**{**T5_XXL, "num_layers": t5_layers}) if published else T5Config(
        vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)

    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build in float16: a 2B-parameter model never exists in float32 here
    try:
        config = dict(FAMILIES[family])
        if blocks is not None:
            config.update(num_layers=blocks, dual_attention_layers=tuple(i for i in config.get("dual_attention_layers", ()) if i < blocks))
        transformer = getattr(diffusers, sd3.transformer_class)(sample_size=sample_size, **config)
        _randomise_zero_init(transformer, g)
        transformer.to(torch.float16)  # the float32 buffers too (the position table), as in the hub checkpoint
        text_encoder_1, text_encoder_2 = clip("text_encoder", 768, 12), clip("text_encoder_2", 1280, 20)
    finally:
        torch.set_default_dtype(previous)
    with torch.device("meta"):  # materialised tensor by tensor while it is written (write_streamed)
        text_encoder_3 = T5EncoderModel(t5_config) if t5_layers > 0 else None
    vae = AutoencoderKL(**SD3_VAE).to(torch.float16)
    pipe = getattr(diffusers, sd3.pipeline_class)(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=text_encoder_1, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=copy.deepcopy(clip_tok), text_encoder_3=None, tokenizer_3=None,
    )
    built_s = time.perf_counter() - t0
    info = {
        "family": family, "seed": seed, "sample_size": sample_size, "t5_layers": t5_layers, "blocks": transformer.config.num_layers,
        "encoders": encoders, "transformer_parameters": int(sum(p.numel() for p in transformer.parameters())),
        "text_encoder_parameters": {"text_encoder": int(sum(p.numel() for p in text_encoder_1.parameters())),
                                    "text_encoder_2": int(sum(p.numel() for p in text_encoder_2.parameters()))},
        "note": "random weights with the real transformer and VAE configs; text encoders of the "
                + ("published sizes" if published else "real output widths"),
    }
    with atomic_path(out) as tmp:
        pipe.save_pretrained(str(tmp), max_shard_size="2GB")
        del pipe, transformer, text_encoder_1, text_encoder_2, vae  # T5 is written next, with nothing else held
        if text_encoder_3 is not None:
            write_streamed(text_encoder_3, tmp / "text_encoder_3", g)
            t5_tok.save_pretrained(str(tmp / "tokenizer_3"))
            index = json.loads((tmp / "model_index.json").read_text())
            index["text_encoder_3"] = ["transformers", type(text_encoder_3).__name__]
            index["tokenizer_3"] = ["transformers", type(t5_tok).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            info["text_encoder_parameters"]["text_encoder_3"] = int(sum(p.numel() for p in text_encoder_3.parameters()))
        (tmp / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("%s fixture (%.2fB transformer parameters) built in %.1f s, saved in %.1f s -> %s", family,
             info["transformer_parameters"] / 1e9, built_s, info["seconds"] - built_s, out)
    return info


def main(argv: list[str] | None = None) -> int:
    from common.cli import ArgumentParser, int_at_least, run_command, setup_logging

    ap = ArgumentParser(prog="scripts/make_scale_fixture.py", description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd3-medium", choices=sorted(FAMILIES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--sample-size", type=int_at_least(2), default=32, help="default latent size (default 32: 256 px; the hub config says 128)")
    ap.add_argument("--t5-layers", type=int_at_least(0), default=None,
                    help="T5 encoder layers of the real width (default 1, or T5-XXL's 24 with --encoders published; 0: no T5)")
    ap.add_argument("--encoders", choices=ENCODERS, default="small",
                    help="text encoders: small (2-layer CLIPs and T5 of the real output widths; the default) or published (their published sizes)")
    ap.add_argument("--blocks", type=int_at_least(1), default=None, help="transformer blocks to keep (default: all the published config has)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    args = ap.parse_args(argv)
    setup_logging()

    def body() -> int:
        from common.io import check_output

        check_output(args.out, "dir")
        t5_layers = args.t5_layers if args.t5_layers is not None else (T5_XXL["num_layers"] if args.encoders == "published" else 1)
        build(args.family, args.out, sample_size=args.sample_size, t5_layers=t5_layers, seed=args.seed, blocks=args.blocks, encoders=args.encoders)
        print(args.out)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
