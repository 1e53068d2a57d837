"""Build and train the embedded tiny models, ``tiny-sd3`` (default) and ``tiny-flux``, from scratch and offline.

Each is a complete diffusers pipeline made of the real classes, small, trained on scikit-learn's digits to
draw the digit its prompt names ("a handwritten digit 7"). Shared by both families:
  - tokenizers built here from the prompt vocabulary (CLIP BPE, T5 unigram) and random, frozen text encoders:
    CLIP (hidden 64) and a ``T5EncoderModel`` (d_model 128);
  - an ``AutoencoderKL`` (32x32 RGB <-> 4x8x8 latents), trained first as an autoencoder; the latent statistics
    set its ``shift_factor`` / ``scaling_factor``;
  - a ``FlowMatchEulerDiscreteScheduler`` (shift 1) and the rectified-flow training of the transformer
    (x_t = (1-t) x0 + t eps, target eps - x0, logit-normal t) with prompts dropped to "" 10% of the time
    (classifier-free guidance) and an EMA of the weights, conditioned exactly as the pipeline's
    ``encode_prompt`` conditions it.

``--family sd3``: ``StableDiffusion3Pipeline`` with two ``CLIPTextModelWithProjection`` (projection 64) + T5 and
an ``SD3Transformer2DModel`` (4 blocks, 4 heads of 64, FFN 4x); the T5 part of the context is zeroed 30% of the
time, so the pipeline also works with ``text_encoder_3=None``.

``--family flux``: ``FluxPipeline`` with a ``CLIPTextModel`` (pooled output) + T5 (the sequence) and a
``FluxTransformer2DModel`` (2 double-stream + 4 single-stream blocks, 4 heads of 64, FFN 4x, no guidance
embedding) fed as the pipeline feeds it: 2x2-packed latents (16 tokens of 16 channels), image/text position
ids, timestep t in [0, 1] (the pipeline's ``timestep / 1000``). Sample it with real classifier-free guidance:
``pipe(prompt, negative_prompt="", true_cfg_scale=4.0, num_inference_steps=20, height=32, width=32,
max_sequence_length=10)``.

Weights are saved in float16 (the pipelines load them as float32) to stay under 25 MB.

    python scripts/train_tiny.py --out models/tiny-sd3 --threads 1  # full run (43 min on a busy 2-core box)
    python scripts/train_tiny.py --family flux --out models/tiny-flux --threads 1  # full run (22 min, 1 thread)
    python scripts/train_tiny.py --family flux --out /tmp/t --vae-steps 20 --steps 20   # smoke run
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

from evaluation.digits import TEMPLATES, WORDS, all_prompts, load_split, random_shift, to_pixels  # noqa: E402
from common.cli import setup_logging  # noqa: E402
from common.io import atomic_path, writing_repository_models  # noqa: E402

log = logging.getLogger("train_tiny")

CLIP_LEN = 10  # CLIP tokens (tokenizer model_max_length)
T5_LEN = 10  # T5 tokens (pipeline max_sequence_length; the registry's default for the tiny models)
# Training settings (the script's defaults); both families train with the same ones.
TRAIN_DEFAULTS = dict(vae_steps=400, vae_batch=32, steps=3000, batch=32, lr=5e-4, ema=0.999, augment=6)


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


def clip_config(clip_tok, projection: bool) -> dict:
    """The tiny CLIP text encoder (hidden 64); ``projection`` adds SD3's 64-wide text projection."""
    cfg = dict(
        vocab_size=len(clip_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LEN, hidden_act="gelu",
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )
    if projection:
        cfg["projection_dim"] = 64
    return cfg


def build_t5(t5_tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        )
    )


def build_vae():
    """32x32 RGB <-> 4x8x8 latents (factor 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
    )



def diffusers_class(family: str, kind: str):
    """The diffusers class the family's adapter names (``transformer_class`` or ``pipeline_class``)."""
    import diffusers

    from families import get_adapter

    return getattr(diffusers, getattr(get_adapter(family), kind))

class SD3Family:
    """``StableDiffusion3Pipeline``: two CLIP encoders with projection + T5, ``SD3Transformer2DModel``."""

    name = "sd3"
    defaults = TRAIN_DEFAULTS
    t5_dropout = 0.3  # the T5 part of the context is zeroed this often (the pipeline also runs without T5)

    def text_encoders(self, clip_tok, t5_tok) -> dict:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        cfg = clip_config(clip_tok, projection=True)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
        return dict(
            text_encoder=text_encoder, tokenizer=clip_tok,
            text_encoder_2=text_encoder_2, tokenizer_2=copy.deepcopy(clip_tok),
            text_encoder_3=build_t5(t5_tok), tokenizer_3=t5_tok,
        )

    def transformer(self):
        return diffusers_class("sd3", "transformer_class")(
            sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=4,
            joint_attention_dim=128, caption_projection_dim=256, pooled_projection_dim=128, out_channels=4,
            pos_embed_max_size=8,
        )

    def pipeline(self, **components):
        return diffusers_class("sd3", "pipeline_class")(**components)

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Pipeline-exact conditioning: embeds (P, CLIP_LEN + T5_LEN, 128), pooled (P, 128)."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=T5_LEN,
        )
        return {"embeds": embeds, "pooled": pooled}

    def corrupt(self, cond: dict, g: torch.Generator) -> None:
        drop_t5 = torch.rand(len(cond["embeds"]), generator=g) < self.t5_dropout
        cond["embeds"][drop_t5, CLIP_LEN:] = 0.0

    def predict(self, pipe, transformer, xt: torch.Tensor, cond: dict, t: torch.Tensor) -> torch.Tensor:
        """Velocity for latents ``xt`` (B, 4, 8, 8) at times ``t`` in [0, 1]; SD3 takes the timestep x1000."""
        return transformer(
            hidden_states=xt, encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"],
            timestep=t * 1000,
        ).sample


class FluxFamily:
    """``FluxPipeline``: CLIP (pooled only) + T5 (the sequence), ``FluxTransformer2DModel`` on 2x2-packed latents.

    No guidance embedding (Flux.1-dev's is distilled, which cannot be done here): the model is trained with
    prompt dropout and sampled with real classifier-free guidance (``true_cfg_scale``, ``negative_prompt=""``).
    """

    name = "flux"
    defaults = TRAIN_DEFAULTS
    head_dim = 64  # 4 heads of 64: inner width 256, as tiny-sd3

    def text_encoders(self, clip_tok, t5_tok) -> dict:
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config(clip_tok, projection=False)))
        return dict(text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=build_t5(t5_tok), tokenizer_2=t5_tok)

    def transformer(self):
        d = self.head_dim
        rope = (d // 4, 3 * d // 8, 3 * d // 8)  # (t, y, x) axes, as Flux's (16, 56, 56) for 128
        return diffusers_class("flux", "transformer_class")(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=d,
            num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
            axes_dims_rope=rope,
        )

    def pipeline(self, **components):
        return diffusers_class("flux", "pipeline_class")(**components)

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Pipeline-exact conditioning: T5 embeds (P, T5_LEN, 128), pooled CLIP (P, 64); text ids kept aside."""
        embeds, pooled, self.txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=T5_LEN)
        return {"embeds": embeds, "pooled": pooled}

    def corrupt(self, cond: dict, g: torch.Generator) -> None:
        pass  # FluxPipeline always runs its T5 encoder

    def predict(self, pipe, transformer, xt: torch.Tensor, cond: dict, t: torch.Tensor) -> torch.Tensor:
        """Velocity for latents ``xt`` (B, 4, 8, 8) at times ``t`` in [0, 1], fed as FluxPipeline feeds it:
        packed 2x2 (B, 16, 16), image/text position ids, timestep ``t`` (the pipeline's ``timestep / 1000``)."""
        b, c, h, w = xt.shape
        packed = pipe._pack_latents(xt, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
        out = transformer(
            hidden_states=packed, timestep=t, guidance=None, pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"], txt_ids=self.txt_ids, img_ids=img_ids,
        ).sample
        return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


FAMILIES = {f.name: f for f in (SD3Family, FluxFamily)}


def build_pipeline(seed: int = 0, family: str = "sd3"):
    """The untrained pipeline of ``family`` with the final architecture; returns ``(pipe, family object)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam = FAMILIES[family]()
    torch.manual_seed(seed)
    clip_tok, t5_tok = build_tokenizers()
    encoders = fam.text_encoders(clip_tok, t5_tok)
    vae = build_vae()
    transformer = fam.transformer()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = fam.pipeline(transformer=transformer, scheduler=scheduler, vae=vae, **encoders)
    pipe.set_progress_bar_config(disable=True)
    return pipe, fam


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


def train_transformer(pipe, fam, latents, labels, steps: int, batch: int, lr: float, seed: int, ema_decay: float):
    """Rectified-flow training of ``pipe.transformer`` (x_t = (1-t) x0 + t eps, target eps - x0, logit-normal t,
    prompts dropped to "" 10% of the time for classifier-free guidance); returns the EMA copy."""
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(seed)
    prompts = [t.format(d=d, w=WORDS[d]) for t in TEMPLATES for d in range(10)]
    table = fam.encode(pipe, prompts + [""])
    empty = {k: v[-1] for k, v in table.items()}
    table = {k: v[:-1].view(len(TEMPLATES), 10, *v.shape[1:]) for k, v in table.items()}

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
        cond = {k: v[tmpl, digit].clone() for k, v in table.items()}
        fam.corrupt(cond, g)
        drop = torch.rand(batch, generator=g) < 0.1
        for k, v in cond.items():
            v[drop] = empty[k]
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, as SD3 and Flux
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        pred = fam.predict(pipe, transformer, xt, cond, t)
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
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd3", help="pipeline family to build")
    ap.add_argument("--out", help="output pipeline directory, diffusers format (default: models/tiny-<family>)")
    ap.add_argument("--vae-steps", type=int)
    ap.add_argument("--vae-batch", type=int)
    ap.add_argument("--steps", type=int, help="transformer training steps")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--ema", type=float)
    ap.add_argument("--augment", type=int, help="shifted copies of each training digit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    for key, value in FAMILIES[args.family].defaults.items():  # options left out take the family's defaults
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"models/tiny-{args.family}"
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()

    pipe, fam = build_pipeline(args.seed, args.family)
    images8, labels = load_split("generator")
    pixels = to_pixels(images8)  # (N, 1, 32, 32)
    train_vae(pipe.vae, pixels, args.vae_steps, args.vae_batch, args.seed)

    # Latent statistics set the VAE's scaling/shift, as SD3's and Flux's VAE configs do.
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        copies = [pixels] + [random_shift(pixels, 2, g) for _ in range(args.augment)]
        raw = torch.cat([pipe.vae.encode(to_model_space(c)).latent_dist.mean for c in copies])
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale  # (N * (augment + 1), 4, 8, 8), unit variance
    all_labels = labels.repeat(args.augment + 1)
    log.info("VAE latent shift %.4f scale %.4f; %d training latents", shift, scale, len(latents))

    ema = train_transformer(pipe, fam, latents, all_labels, args.steps, args.batch, args.lr, args.seed, args.ema)
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)

    out = Path(args.out)
    with writing_repository_models(), atomic_path(out) as tmp:  # this script builds the embedded models
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("saved %s (%.1f MB) in %.0f s", out, size / 1e6, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
