"""Build a random-weight diffusers pipeline with a real model's shapes, offline, for scale tests.

Hub weights cannot be downloaded here, but memory and time depend on shapes, not values: this writes a
``StableDiffusion3Pipeline`` directory whose transformer and VAE have the real configs of the chosen family
(``sd3-medium``: 24 blocks, 24 heads of 64, 2.0B parameters) with seeded random weights, and small text
encoders of the real output widths (CLIP-L 768, CLIP-G 1280, T5 4096, so the transformer sees real
``encoder_hidden_states`` shapes: 77 CLIP + 256 T5 tokens), reusing tiny-sd3's offline tokenizers.

    python scripts/make_scale_fixture.py --family sd3-medium --out artifacts/fixtures/sd3-medium

Options: ``--sample-size`` sets the transformer's default latent size (the default image size is 8x that;
the real model says 128, i.e. 1024 px; the scale check uses 32, i.e. 256 px, to keep CPU runs short; the
position embedding still covers the real maximum), ``--t5-layers`` the depth of the T5 encoder (the real
T5-XXL has 24 layers, 4.7B parameters; each layer here is one of its real width), ``--blocks`` keeps only that
many transformer blocks of the real width (a few-block model for per-call checks). Weights are stored in
float16, as on the hub. Another family is one entry of :data:`FAMILIES`.
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

from common.io import atomic_path  # noqa: E402
from common.paths import REPO_ROOT  # noqa: E402
from families import get_adapter  # noqa: E402

log = logging.getLogger("make_scale_fixture")

# Transformer and VAE configs as published with the hub checkpoints, from the SD3 family adapter.
sd3 = get_adapter("sd3")
FAMILIES = sd3.published_configs
SD3_VAE = sd3.published_vae_config
CLIP_LEN = 77
TOKENIZERS = REPO_ROOT / "models" / "tiny-sd3"


def _randomise_zero_init(module: torch.nn.Module, generator: torch.Generator) -> None:
    """diffusers zero-initialises AdaLN modulations and output projections; a random model that
    calibrates and prunes like a trained one needs them non-zero."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02).to(p.dtype))


def build(family: str, out: Path, *, sample_size: int, t5_layers: int, seed: int, blocks: int | None = None) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clip_tok = CLIPTokenizer.from_pretrained(TOKENIZERS / "tokenizer")
    clip_tok.model_max_length = CLIP_LEN
    t5_tok = T5Tokenizer.from_pretrained(TOKENIZERS / "tokenizer_3")
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)

    def clip(hidden: int, heads: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2, num_attention_heads=heads,
            max_position_embeddings=CLIP_LEN, projection_dim=hidden, hidden_act="gelu", **ids))

    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build in float16: a 2B-parameter model never exists in float32 here
    try:
        config = dict(FAMILIES[family])
        if blocks is not None:
            config.update(num_layers=blocks, dual_attention_layers=tuple(i for i in config.get("dual_attention_layers", ()) if i < blocks))
        transformer = getattr(diffusers, sd3.transformer_class)(sample_size=sample_size, **config)
        _randomise_zero_init(transformer, g)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)) if t5_layers > 0 else None
    finally:
        torch.set_default_dtype(previous)
    vae = AutoencoderKL(**SD3_VAE).to(torch.float16)
    pipe = getattr(diffusers, sd3.pipeline_class)(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=clip(768, 12).to(torch.float16), tokenizer=clip_tok,
        text_encoder_2=clip(1280, 20).to(torch.float16), tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok if text_encoder_3 is not None else None,
    )
    built_s = time.perf_counter() - t0
    with atomic_path(out) as tmp:
        pipe.save_pretrained(str(tmp), max_shard_size="2GB")
        info = {
            "family": family, "seed": seed, "sample_size": sample_size, "t5_layers": t5_layers, "blocks": transformer.config.num_layers,
            "transformer_parameters": int(sum(p.numel() for p in transformer.parameters())),
            "note": "random weights with the real transformer and VAE configs; text encoders of the real output widths",
        }
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
    ap.add_argument("--t5-layers", type=int_at_least(0), default=1, help="T5 encoder layers of the real width (default 1; 0: no T5)")
    ap.add_argument("--blocks", type=int_at_least(1), default=None, help="transformer blocks to keep (default: all the published config has)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    args = ap.parse_args(argv)
    setup_logging()

    def body() -> int:
        from common.io import check_output

        check_output(args.out, "dir")
        build(args.family, args.out, sample_size=args.sample_size, t5_layers=args.t5_layers, seed=args.seed, blocks=args.blocks)
        print(args.out)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
