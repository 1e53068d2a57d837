"""Build and train ``tiny-sd3``, the embedded default model, from scratch and offline.

A complete diffusers ``StableDiffusion3Pipeline`` made of the real classes, small:
  - two ``CLIPTextModelWithProjection`` (hidden 64, projection 64) and a ``T5EncoderModel`` (d_model 128),
    random and frozen, with tokenizers built here from the prompt vocabulary;
  - an ``AutoencoderKL`` (32x32 RGB <-> 4x8x8 latents), trained first as an autoencoder;
  - an ``SD3Transformer2DModel`` (4 blocks, 4 heads of 64, FFN 4x), trained with the rectified-flow loss of
    SD3 (x_t = (1-t) x0 + t eps, target eps - x0, logit-normal t) on scikit-learn's digits, conditioned on
    prompts such as "a handwritten digit 7"; prompts are dropped 10% of the time (classifier-free guidance)
    and the T5 part is zeroed 30% of the time, so the pipeline also works with ``text_encoder_3=None``.

Weights are saved in float16 (the pipeline loads them as float32) to stay under 25 MB.

    python scripts/train_tiny_sd3.py --out models/tiny-sd3 --threads 1  # full run (43 min on a busy 2-core box)
    python scripts/train_tiny_sd3.py --out /tmp/t --vae-steps 20 --steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.digits import TEMPLATES, WORDS, all_prompts, load_split, random_shift, to_pixels  # noqa: E402
from common.io import atomic_path  # noqa: E402

log = logging.getLogger("train_tiny_sd3")

CLIP_LEN = 10  # CLIP tokens (tokenizer model_max_length)
T5_LEN = 10  # T5 tokens (pipeline max_sequence_length; the registry's default for tiny-sd3)


def prompt_vocabulary() -> list[str]:
    words = set()
    for t in TEMPLATES:
        for d in range(10):
            words.update(t.format(d=d, w=WORDS[d]).replace(",", " ,").split())
    return sorted(words)


def build_tokenizers():
    """CLIP BPE tokenizers and a T5 unigram tokenizer whose vocabulary covers the prompts (plus characters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer, T5Tokenizer

    corpus = all_prompts() * 20 + [" ".join(WORDS), "0 1 2 3 4 5 6 7 8 9"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    state = bpe.model.__getstate__()
    import json

    state = json.loads(state) if isinstance(state, (str, bytes)) else state
    vocab, merges = state["vocab"], state["merges"]
    merges = [tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" ")) for m in merges]
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges)
    clip_tok.model_max_length = CLIP_LEN

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in prompt_vocabulary()]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    t5_tok.model_max_length = 512
    return clip_tok, t5_tok


def build_pipeline(seed: int = 0):
    """The untrained pipeline with the final architecture."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = build_tokenizers()
    ids = dict(
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id
    )
    clip_cfg = dict(
        vocab_size=len(clip_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=64, hidden_act="gelu", **ids,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=128, caption_projection_dim=256, pooled_projection_dim=128, out_channels=4,
        pos_embed_max_size=8,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_model_space(pixels01: torch.Tensor) -> torch.Tensor:
    """(N, 1, 32, 32) in [0, 1] -> (N, 3, 32, 32) in [-1, 1]: white strokes on black, as RGB."""
    return (pixels01 * 2 - 1).expand(-1, 3, -1, -1)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int) -> None:
    """Autoencoder training: L1 + MSE reconstruction with a small KL term."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="vae", unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = to_model_space(random_shift(images[idx], 2, g))
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]):
    """Pipeline-exact conditioning: (embeds (P, CLIP_LEN + T5_LEN, 128), pooled (P, 128))."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN
    )
    return embeds, pooled


def train_transformer(pipe, latents, labels, steps: int, batch: int, lr: float, seed: int, ema_decay: float):
    """Rectified-flow training of ``pipe.transformer``; returns the EMA copy."""
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(seed)
    prompts = [t.format(d=d, w=WORDS[d]) for t in TEMPLATES for d in range(10)]
    embeds, pooled = encode_prompts(pipe, prompts + [""])
    empty_embeds, empty_pooled = embeds[-1], pooled[-1]
    embeds, pooled = embeds[:-1].view(len(TEMPLATES), 10, *embeds.shape[1:]), pooled[:-1].view(len(TEMPLATES), 10, -1)

    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    transformer.train()
    warmup = max(steps // 20, 1)
    bar = tqdm(range(steps), desc="transformer", unit="step")
    for step in bar:
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]  # (B, 4, 8, 8)
        digit = labels[idx]
        tmpl = torch.randint(0, len(TEMPLATES), (batch,), generator=g)
        ctx = embeds[tmpl, digit].clone()  # (B, 20, 128)
        pool = pooled[tmpl, digit].clone()  # (B, 128)
        drop_t5 = torch.rand(batch, generator=g) < 0.3
        ctx[drop_t5, CLIP_LEN:] = 0.0
        drop = torch.rand(batch, generator=g) < 0.1
        ctx[drop], pool[drop] = empty_embeds, empty_pooled
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, as SD3
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        pred = transformer(hidden_states=xt, encoder_hidden_states=ctx, pooled_projections=pool, timestep=t * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - d)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer.eval()
    return ema


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/tiny-sd3", help="output pipeline directory (diffusers format)")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3000, help="transformer training steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--augment", type=int, default=6, help="shifted copies of each training digit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    pipe = build_pipeline(args.seed)
    images8, labels = load_split("generator")
    pixels = to_pixels(images8)  # (N, 1, 32, 32)
    train_vae(pipe.vae, pixels, args.vae_steps, args.vae_batch, args.seed)

    # Latent statistics set the VAE's scaling/shift, as SD3's VAE config does.
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        copies = [pixels] + [random_shift(pixels, 2, g) for _ in range(args.augment)]
        raw = torch.cat([pipe.vae.encode(to_model_space(c)).latent_dist.mean for c in copies])
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale  # (N * (augment + 1), 4, 8, 8), unit variance
    all_labels = labels.repeat(args.augment + 1)
    log.info("VAE latent shift %.4f scale %.4f; %d training latents", shift, scale, len(latents))

    ema = train_transformer(pipe, latents, all_labels, args.steps, args.batch, args.lr, args.seed, args.ema)
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)

    out = Path(args.out)
    with atomic_path(out) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("saved %s (%.1f MB) in %.0f s", out, size / 1e6, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
