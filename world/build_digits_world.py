"""Build the digits world: a trained tiny text-to-image LCM and reward models on real handwritten digits.

    python -m world.build_digits_world --out world/digits [--seed 0]

Everything is trained here, on the CPU, seeded, from scikit-learn's bundled digits (1,797 8x8
images; every 5th held out), rendered as 32x32 RGB navy ink on cream paper with captions such
as "a thick handwritten digit seven" (stroke-thickness word from the ink mass, see
world/digits_metrics.py). Everything is saved in the real on-disk formats, so the scripts load it
through their ordinary from_pretrained paths:

    OUT/clip/          transformers CLIPModel + CLIPTokenizer, trained contrastively (pickscore / hpsv2 /
                       clipscore reward): load_reward("clipscore", "OUT/clip")
    OUT/aesthetic/     the same CLIP + the LAION-format head file (a linear-by-design MLP on the normalized
                       image embedding) regressing stroke thickness (z-scored ink mass): load_reward("aesthetic", ...)
    OUT/lcm/           LatentConsistencyModelPipeline: word-level CLIPTokenizer, CLIPTextModel (the CLIP's text
                       tower), AutoencoderKL (32x32 -> 4x8x8), UNet2DConditionModel with time_cond_proj_dim,
                       LCMScheduler (SD's schedule); distilled by latent consistency distillation from a
                       classifier-free-guided teacher UNet trained here
    OUT/classifier.pt  evaluation only: a CNN digit classifier (world/digits_metrics.DigitClassifier)
    OUT/prompts_train.txt, OUT/prompts_eval.txt, OUT/samples_4step.png, OUT/metrics.json, OUT/README.md

Stages: tokenizer -> CLIP -> aesthetic head -> VAE -> teacher UNet -> LCM distillation -> classifier
-> evaluation. --work-dir DIR caches the trained stages (CLIP, VAE, teacher) between runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from world.digits_metrics import (  # noqa: E402
    DIGIT_WORDS, DigitClassifier, PAPER, INK, RESOLUTION, STYLE_WORDS, all_captions, caption, classify, digit_accuracy,
    frechet_distance, ink_of_images, prompt_split, real_digits,
)

MAX_TOKENS = 16  # "a thick handwritten digit seven" is 5 words, 7 tokens with start and end
TEXT_DIM = 64
LATENT_CHANNELS = 4
TIME_COND_DIM = 32
DEFAULT_GUIDANCE = 8.5  # the pipeline's default; the LCM is distilled for w = guidance - 1 in [W_MIN, W_MAX]
W_MIN, W_MAX = 1.0, 8.0
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
STEPS = dict(clip=700, vae=1500, teacher=3000, lcm=1500, classifier=900)  # scaled by --steps-scale


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE whose merges make every caption word a single token
# ---------------------------------------------------------------------------------------------

def byte_symbols() -> list[str]:
    """The GPT-2/CLIP byte-level alphabet: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    return [chr(c) for c in printable] + [chr(c) for c in shifted]


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE of one lower-case word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which each word is one token. A merge appended last has the highest rank, so
    it never changes how the words already completed are split (their merges all outrank it)."""
    merges, ranks = [], {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
    return merges


def write_word_tokenizer(directory: Path, words: list[str], max_length: int = MAX_TOKENS):
    """A CLIPTokenizer: every byte (with and without end-of-word) is in the vocabulary, so any text
    tokenizes; the caption words are single tokens. Returns the tokenizer loaded back from disk."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    for symbol in symbols:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges = word_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                  model_max_length=max_length).save_pretrained(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    for word in words:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, f"'{word}' is not a single token: {tokenizer.convert_ids_to_tokens(ids)}"
    return tokenizer


def caption_words() -> list[str]:
    return sorted({word for text in all_captions() for word in text.split()})


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

class Digits:
    """One split of the real digits: images, captions, caption indices, labels and 32x32 ink maps."""

    def __init__(self, split: str):
        self.images, self.captions, self.labels = real_digits(split)
        self.caption_list = all_captions()
        self.caption_index = torch.tensor([self.caption_list.index(c) for c in self.captions])
        self.ink = ink_of_images(self.images)

    def __len__(self) -> int:
        return len(self.images)


def augment(ink: torch.Tensor, generator: torch.Generator, rotate: float, scale: float, shift: float,
            noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine of ink maps (N, H, W), rendered to RGB, plus pixel noise. Returns (images, ink)."""
    n = len(ink)
    uniform = lambda: torch.rand(n, generator=generator) * 2 - 1  # noqa: E731
    angle, zoom = uniform() * math.radians(rotate), 1 + uniform() * scale
    tx, ty = uniform() * shift * 2 / ink.shape[-1], uniform() * shift * 2 / ink.shape[-1]
    theta = torch.stack([torch.stack([angle.cos() / zoom, -angle.sin() / zoom, tx], 1),
                         torch.stack([angle.sin() / zoom, angle.cos() / zoom, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, *ink.shape[-2:]), align_corners=False)
    moved = F.grid_sample(ink[:, None], grid, padding_mode="zeros", align_corners=False)[:, 0].clamp(0, 1)
    paper, colour = torch.tensor(PAPER).view(1, 3, 1, 1), torch.tensor(INK).view(1, 3, 1, 1)
    images = paper * (1 - moved[:, None]) + colour * moved[:, None]
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), moved


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless random mini-batch indices (reshuffled every epoch)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def warmup_cosine(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, 1 - decay)


# ---------------------------------------------------------------------------------------------
# CLIP (the rewards' model and the LCM's text encoder) and the aesthetic head
# ---------------------------------------------------------------------------------------------

def _pooled(output):
    """transformers 5 returns a model output from get_*_features; older versions the tensor."""
    return getattr(output, "pooler_output", output)


def train_clip(tokenizer, train: Digits, steps: int, seed: int, batch_size: int = 128):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=RESOLUTION, patch_size=4),
        projection_dim=64,
    )
    model = CLIPModel(config)
    from common import clip_preprocess

    caption_ids = tokenize(tokenizer, train.caption_list)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    batch_iter = batches(len(train), batch_size, generator)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * warmup_cosine(step, steps)
        index = next(batch_iter)
        images, _ = augment(train.ink[index], generator, rotate=8, scale=0.08, shift=1.5, noise=0.03)
        image = F.normalize(_pooled(model.get_image_features(pixel_values=clip_preprocess(images, RESOLUTION))), dim=-1)
        text = F.normalize(_pooled(model.get_text_features(input_ids=caption_ids)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T  # (B, num_captions)
        target = train.caption_index[index]
        # image -> caption: a closed-set classification over all captions; caption -> image: every image
        # of the batch with that caption is a positive (several images share one caption)
        loss_image = F.cross_entropy(logits, target)
        present = target.unique()
        positives = (target[None, :] == present[:, None]).float()
        loss_text = -(logits.T[present].log_softmax(-1) * positives / positives.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_image + loss_text) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            accuracy = (logits.argmax(-1) == target).float().mean().item()
            log(f"clip step {step}/{steps} loss {loss.item():.3f} caption accuracy {accuracy:.2f} "
                f"logit scale {model.logit_scale.exp().item():.1f}")
    return model.eval()


def train_aesthetic_head(reward, train: Digits, seed: int, epochs: int = 8):
    """Regress z-scored ink mass (stroke thickness) on CLIP's normalized image embedding.

    The head is the LAION layout (common.aesthetic_mlp): linear layers with dropout only, so in
    eval mode the score is an affine function of the embedding, as for the real aesthetic predictor.
    """
    from common import aesthetic_mlp

    generator = torch.Generator().manual_seed(seed + 7)
    features, targets = [], []
    with torch.no_grad():
        for _ in range(epochs):  # augmented copies; the target is the ink mass of the augmented image
            images, ink = augment(train.ink, generator, rotate=8, scale=0.08, shift=1.5, noise=0.03)
            features.append(reward.image_embeds(images))
            targets.append(ink.flatten(1).mean(1))
    features, targets = torch.cat(features), torch.cat(targets)
    mean, std = targets.mean().item(), targets.std().item()
    targets = (targets - mean) / std
    torch.manual_seed(seed + 7)
    head = aesthetic_mlp(features.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    head.train()
    for step in range(1500):
        index = torch.randint(len(features), (512,), generator=generator)
        loss = F.mse_loss(head(features[index]).squeeze(-1), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        fit = F.mse_loss(head(features).squeeze(-1), targets).item()
    log(f"aesthetic head: train MSE {fit:.3f} (target variance 1); ink mass mean {mean:.4f} std {std:.4f}")
    return head, dict(ink_mass_mean=mean, ink_mass_std=std)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------

def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                         sample_size=RESOLUTION)


def train_vae(train: Digits, steps: int, seed: int, kl_weight: float = 1e-3, batch_size: int = 32):
    torch.manual_seed(seed + 1)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    batch_iter = batches(len(train), batch_size, generator)
    vae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * warmup_cosine(step, steps, floor=0.05)
        index = next(batch_iter)
        images, _ = augment(train.ink[index], generator, rotate=5, scale=0.05, shift=1.0, noise=0.0)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=None)).sample
        recon = F.mse_loss(reconstruction, x) + F.l1_loss(reconstruction, x)
        kl = posterior.kl().mean() / (LATENT_CHANNELS * (RESOLUTION // 4) ** 2)  # per latent dimension
        loss = recon + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} recon {recon.item():.4f} kl/dim {kl.item():.2f}")
    vae.eval()
    with torch.no_grad():
        std = vae.encode(train.images * 2 - 1).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae latent std {std:.3f} -> scaling_factor {1 / std:.4f}")
    return vae


@torch.no_grad()
def encode_latent_stats(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images, already multiplied by the scaling factor."""
    dist = vae.encode(images * 2 - 1).latent_dist
    s = vae.config.scaling_factor
    return dist.mean * s, dist.std * s


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Teacher UNet (epsilon prediction, classifier-free guidance by caption dropout)
# ---------------------------------------------------------------------------------------------

def make_unet(time_cond_proj_dim=None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=4, norm_num_groups=16, time_cond_proj_dim=time_cond_proj_dim,
    )


def alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE).alphas_cumprod.float()


class LatentData:
    """Posterior statistics of the training images' latents and their text embeddings (by caption)."""

    def __init__(self, vae, text_encoder, tokenizer, train: Digits):
        self.mean, self.std = encode_latent_stats(vae, train.images)
        with torch.no_grad():
            self.caption_embeds = text_encoder(tokenize(tokenizer, train.caption_list))[0]
            self.empty_embed = text_encoder(tokenize(tokenizer, [""]))[0]
        self.caption_index = train.caption_index

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(self.mean[index].shape, generator=generator)
        return self.mean[index] + self.std[index] * noise, self.caption_embeds[self.caption_index[index]]


def train_teacher(data: LatentData, steps: int, seed: int, batch_size: int = 128, dropout: float = 0.1):
    torch.manual_seed(seed + 2)
    unet = make_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    acp = alphas_cumprod()
    snr = acp / (1 - acp)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 2)
    batch_iter = batches(len(data.mean), batch_size, generator)
    unet.train()
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * warmup_cosine(step, steps, warmup=200, floor=0.1)
        index = next(batch_iter)
        latents, embeds = data.sample(index, generator)
        drop = torch.rand(len(index), generator=generator) < dropout
        embeds = torch.where(drop[:, None, None], data.empty_embed.expand_as(embeds), embeds)
        t = torch.randint(0, 1000, (len(index),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        eps = unet(a * latents + s * noise, t, encoder_hidden_states=embeds).sample
        weight = snr[t].clamp(max=5.0) / snr[t]  # min-SNR-5 weighting for epsilon prediction
        loss = (weight * (eps - noise).square().mean((1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, unet, min(0.999, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"teacher step {step}/{steps} loss {running:.4f}")
    return ema.eval()


@torch.no_grad()
def ddim_sample(unet, embeds, uncond, guidance: float, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance (for checking the teacher)."""
    acp = alphas_cumprod()
    timesteps = torch.linspace(999, 0, steps).round().long()
    x = torch.randn((len(embeds), LATENT_CHANNELS, RESOLUTION // 4, RESOLUTION // 4), generator=generator)
    for i, t in enumerate(timesteps):
        eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([embeds, uncond.expand_as(embeds)])).sample.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = (x - (1 - acp[t]).sqrt() * eps) / acp[t].sqrt()
        prev = acp[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    return x


# ---------------------------------------------------------------------------------------------
# Latent consistency distillation (Luo et al. 2023), as diffusers' train_lcm_distill_sd_wds.py
# ---------------------------------------------------------------------------------------------

def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The pipeline's own embedding of w = guidance_scale - 1 (it multiplies by 1000 itself)."""
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCMScheduler's c_skip and c_out at timesteps t."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def distill_lcm(teacher, data: LatentData, steps: int, seed: int, batch_size: int = 128,
                num_ddim_timesteps: int = 50, ema_decay: float = 0.95, lr: float = 2e-4, huber_c: float = 1e-3):
    torch.manual_seed(seed + 3)
    student = make_unet(time_cond_proj_dim=TIME_COND_DIM)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in key for key in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher at any w
    target = copy.deepcopy(student).requires_grad_(False).eval()
    teacher.requires_grad_(False).eval()

    acp = alphas_cumprod()
    skip = 1000 // num_ddim_timesteps
    ddim_timesteps = torch.arange(1, num_ddim_timesteps + 1) * skip - 1  # 19, 39, ..., 999
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 3)
    batch_iter = batches(len(data.mean), batch_size, generator)
    student.train()
    running = None

    def view(v):
        return v.view(-1, 1, 1, 1)

    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup=100, floor=0.1)
        index = next(batch_iter)
        latents, embeds = data.sample(index, generator)
        n = len(index)
        t_start = ddim_timesteps[torch.randint(0, num_ddim_timesteps, (n,), generator=generator)]
        t_prev = (t_start - skip).clamp(min=0)
        noise = torch.randn(latents.shape, generator=generator)
        a_s, s_s = view(acp[t_start].sqrt()), view((1 - acp[t_start]).sqrt())
        a_p, s_p = view(acp[t_prev].sqrt()), view((1 - acp[t_prev]).sqrt())
        x_start = a_s * latents + s_s * noise
        w = W_MIN + (W_MAX - W_MIN) * torch.rand(n, generator=generator)
        w_embedding = guidance_embedding(w, TIME_COND_DIM)
        c_skip_s, c_out_s = boundary_scalings(t_start)
        c_skip_p, c_out_p = boundary_scalings(t_prev)

        eps = student(x_start, t_start, timestep_cond=w_embedding, encoder_hidden_states=embeds).sample
        prediction = c_skip_s * x_start + c_out_s * (x_start - s_s * eps) / a_s

        with torch.no_grad():
            eps_c, eps_u = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                                   encoder_hidden_states=torch.cat([embeds, data.empty_embed.expand_as(embeds)])).sample.chunk(2)
            x0_c, x0_u = (x_start - s_s * eps_c) / a_s, (x_start - s_s * eps_u) / a_s
            x0_guided = x0_c + view(w) * (x0_c - x0_u)
            eps_guided = eps_c + view(w) * (eps_c - eps_u)
            x_prev = a_p * x0_guided + s_p * eps_guided  # one DDIM step of the guided teacher
            eps_t = target(x_prev, t_prev, timestep_cond=w_embedding, encoder_hidden_states=embeds).sample
            goal = c_skip_p * x_prev + c_out_p * (x_prev - s_p * eps_t) / a_p

        loss = (torch.sqrt((prediction - goal).square() + huber_c**2) - huber_c).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        ema_update(target, student, ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"lcm step {step}/{steps} huber loss {running:.4f}")
    return target  # the EMA network is the consistency model, as in the LCM paper


# ---------------------------------------------------------------------------------------------
# Held-out classifier
# ---------------------------------------------------------------------------------------------

def train_classifier(train: Digits, steps: int, seed: int) -> DigitClassifier:
    torch.manual_seed(seed + 100)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 100)
    batch_iter = batches(len(train), 64, generator)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * warmup_cosine(step, steps, floor=0.02)
        index = next(batch_iter)
        images, _ = augment(train.ink[index], generator, rotate=12, scale=0.12, shift=2.5, noise=0.05)
        # colour jitter: the judge must read digits, not the exact ink colour
        gain = 1 + 0.15 * (torch.rand(len(index), 3, 1, 1, generator=generator) * 2 - 1)
        images = (0.5 + (images - 0.5) * gain).clamp(0, 1)
        loss = F.cross_entropy(model(images), train.labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 300 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.3f}")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Saving and evaluation
# ---------------------------------------------------------------------------------------------

def save_pipeline(directory: Path, tokenizer_dir: Path, text_encoder, vae, unet) -> None:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    from transformers import CLIPTokenizer

    scheduler = LCMScheduler(**SCHEDULE, original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True,
                             clip_sample=False, prediction_type="epsilon")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder,
                                          tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    shutil.rmtree(directory, ignore_errors=True)
    pipe.save_pretrained(directory)


def ranking_accuracy(reward, images: torch.Tensor, captions: list[str], swap) -> float:
    """Fraction of (image, own caption) pairs scored above (image, swap(caption))."""
    with torch.no_grad():
        image = reward.image_embeds(images)
        own = (image * reward.text_embeds(captions)).sum(-1)
        other = (image * reward.text_embeds([swap(c) for c in captions])).sum(-1)
    return (own > other).float().mean().item()


def other_digit(text: str, offset: int = 1) -> str:
    words = text.split()
    words[-1] = DIGIT_WORDS[(DIGIT_WORDS.index(words[-1]) + offset) % 10]
    return " ".join(words)


def other_thickness(text: str) -> str:
    return text.replace("thick", "THIN").replace("thin", "thick").replace("THIN", "thin")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


def evaluation_prompts(count: int) -> list[str]:
    _, eval_prompts = prompt_split()
    return [eval_prompts[i % len(eval_prompts)] for i in range(count)]


@torch.no_grad()
def sample_pipeline(pipe, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION,
                generator=generator, output_type="pt").images


def save_grid(images: torch.Tensor, path: Path, columns: int, upscale: int = 2) -> None:
    from PIL import Image

    images = F.interpolate(images.float().clamp(0, 1), scale_factor=upscale, mode="nearest")
    images = (images * 255).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.full((3, rows * (h + 2) + 2, columns * (w + 2) + 2), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = image
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def write_readme(out: Path, metrics: dict, args, seconds: float) -> None:
    m = metrics
    lcm = m["lcm"]
    rows = "\n".join(
        f"| {g} | " + " | ".join(f"{lcm[str(g)][str(k)]['accuracy']:.3f}" for k in (1, 2, 4, 8))
        + f" | {lcm[str(g)]['4']['frechet']:.2f} |" for g in m["guidance_scales"])
    text = f"""# The digits world

A miniature, fully trained text-to-image world for measuring alignment algorithms on a CPU in
minutes. Built by `python -m world.build_digits_world --out {args.out} --seed {args.seed}` in
{seconds / 60:.1f} minutes ({m['threads']} CPU threads); every figure below is measured by that build
(see `metrics.json`). Data: scikit-learn's bundled `load_digits` (1,797 8x8 images), bilinearly
upscaled to 32x32 RGB, navy ink on cream paper; every 5th image (360) is held out for evaluation.
Captions: "a handwritten digit seven", with "thin"/"thick" for the lower/upper ink-mass tercile
("a thick handwritten digit seven"): 30 captions.

| path | what | loads with |
|---|---|---|
| `lcm/` | LatentConsistencyModelPipeline: word-level CLIPTokenizer (16 tokens), CLIPTextModel (the CLIP's text tower), AutoencoderKL 32x32x3 -> 4x8x8, UNet2DConditionModel (time_cond_proj_dim {TIME_COND_DIM}), LCMScheduler (SD schedule) | `rocm_kl.load_lcm`, `LatentConsistencyModelPipeline.from_pretrained` |
| `clip/` | CLIPModel (ViT 32 px, patch 4; projection 64) + tokenizer, trained contrastively on the digits | `common.load_reward("clipscore" / "pickscore" / "hpsv2", "{args.out}/clip")` |
| `aesthetic/` | the same CLIP + `{m['aesthetic_head_file']}`: LAION-layout head regressing stroke thickness (z-scored ink mass) | `common.load_reward("aesthetic", "{args.out}/aesthetic")` |
| `classifier.pt` | evaluation only: CNN digit classifier (`world.digits_metrics.DigitClassifier`), trained on real digits only | `world.digits_metrics.load_classifier` |
| `prompts_train.txt`, `prompts_eval.txt` | 20 / 10 captions: per digit one thickness style is held out for evaluation (all 30 captions occur in the world's own training images) | `--prompts-file`, `--eval-prompts-file` |

Default: resolution 32, guidance scale {DEFAULT_GUIDANCE} (the pipeline's and rocm_kl.py's default;
the LCM was distilled for guidance scales {W_MIN + 1:g}..{W_MAX + 1:g}), 4 steps.

## Measured

- Held-out classifier on the 360 real eval digits: accuracy **{m['classifier_accuracy']:.3f}**.
- VAE reconstructions of the real eval digits: MSE {m['vae_mse']:.4f}, classifier accuracy {m['vae_accuracy']:.3f}.
- Teacher (DDIM {m['teacher_steps']} steps, CFG {DEFAULT_GUIDANCE}): accuracy {m['teacher_accuracy']:.3f}.
- LCM samples ({m['lcm_samples']} per cell, eval prompts, seed fixed): digit accuracy by guidance scale and steps,
  and Frechet distance (classifier features) of the 4-step samples to the real eval digits
  (real train digits vs real eval digits, same count: {m['frechet_real']:.2f}; uniform noise: {m['frechet_noise']:.1f}):

| guidance | 1 step | 2 steps | 4 steps | 8 steps | FD (4 steps) |
|---|---|---|---|---|---|
{rows}

- CLIP on real eval digits: the own caption scores above the caption with another digit for
  **{m['clip_digit_ranking']:.3f}** of images, above the caption with the other thickness word
  (thin <-> thick) for {m['clip_thickness_ranking']:.3f}; closed-set caption-digit accuracy {m['clip_digit_accuracy']:.3f}.
- Aesthetic (stroke thickness) vs ink mass on real eval digits: Pearson **{m['aesthetic_pearson']:.3f}**,
  Spearman {m['aesthetic_spearman']:.3f}. Scale: z-score of ink mass (train mean {m['ink_mass_mean']:.4f}, std {m['ink_mass_std']:.4f}).
- 4-step LCM samples at guidance {DEFAULT_GUIDANCE} on the eval prompts: clipscore {m['samples_clipscore']:.3f},
  aesthetic {m['samples_aesthetic']:.3f} (real eval digits: clipscore {m['real_clipscore']:.3f}, aesthetic {m['real_aesthetic']:.3f}).

`samples_4step.png`: 4-step samples at guidance {DEFAULT_GUIDANCE}, one row per digit (columns: the
prompt without, with "thin", with "thick", repeated).

## Use

    python rocm_kl.py --model {args.out}/lcm --reward aesthetic={args.out}/aesthetic \\
        --eval-rewards clipscore={args.out}/clip --prompts-file {args.out}/prompts_train.txt \\
        --eval-prompts-file {args.out}/prompts_eval.txt --resolution 32 --num-inference-steps 4 \\
        --device cpu --mixed-precision no

    from world.digits_metrics import digit_accuracy, frechet_distance, real_digits
"""
    (out / "README.md").write_text(text)


def cached_or_trained(work: Path | None, name: str, load, train):
    """A stage's model from the work directory where an earlier build cached it, else trained (and cached)."""
    if work and (work / name / "config.json").exists():
        log(f"{name}: reused from the work directory")
        return load(work / name)
    model = train()
    if work:
        model.save_pretrained(work / name)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="world/digits", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's training steps (smoke tests)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--work-dir", default=None, help="cache trained CLIP / VAE / teacher here and reuse them")
    args = parser.parse_args()

    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else None
    steps = {k: max(2, round(v * args.steps_scale)) for k, v in STEPS.items()}

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    from common import AESTHETIC_HEAD_FILE, load_reward

    train, evaluation = Digits("train"), Digits("eval")
    log(f"data: {len(train)} train / {len(evaluation)} eval digits, {len(train.caption_list)} captions")
    train_prompts, eval_prompts = prompt_split()
    (out / "prompts_train.txt").write_text("\n".join(train_prompts) + "\n")
    (out / "prompts_eval.txt").write_text("\n".join(eval_prompts) + "\n")

    # 1. tokenizer + CLIP
    clip_dir = out / "clip"
    shutil.rmtree(clip_dir, ignore_errors=True)
    tokenizer = write_word_tokenizer(clip_dir, caption_words())
    clip = cached_or_trained(work, "clip", CLIPModel.from_pretrained,
                             lambda: train_clip(tokenizer, train, steps["clip"], args.seed))
    clip.save_pretrained(clip_dir, safe_serialization=True)
    clip_reward = load_reward("clipscore", str(clip_dir))

    # 2. aesthetic head on the same CLIP
    head, ink_stats = train_aesthetic_head(clip_reward, train, args.seed)
    aesthetic_dir = out / "aesthetic"
    shutil.rmtree(aesthetic_dir, ignore_errors=True)
    shutil.copytree(clip_dir, aesthetic_dir)
    torch.save({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, aesthetic_dir / AESTHETIC_HEAD_FILE)
    aesthetic_reward = load_reward("aesthetic", str(aesthetic_dir))

    # 3. text encoder = the CLIP's text tower
    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())  # layout differs by version
    text_encoder.eval().requires_grad_(False)

    # 4. VAE
    vae = cached_or_trained(work, "vae", AutoencoderKL.from_pretrained, lambda: train_vae(train, steps["vae"], args.seed))
    vae.eval().requires_grad_(False)

    # 5. teacher
    data = LatentData(vae, text_encoder, tokenizer, train)
    teacher = cached_or_trained(work, "teacher", UNet2DConditionModel.from_pretrained,
                                lambda: train_teacher(data, steps["teacher"], args.seed))
    teacher.eval().requires_grad_(False)

    # 6. classifier (evaluation only; needed to check the teacher)
    classifier = train_classifier(train, steps["classifier"], args.seed)
    torch.save(classifier.state_dict(), out / "classifier.pt")
    metrics = {"threads": args.threads, "seed": args.seed, "steps": steps, "aesthetic_head_file": AESTHETIC_HEAD_FILE,
               **ink_stats}
    metrics["classifier_accuracy"] = (classify(evaluation.images, classifier) == evaluation.labels).float().mean().item()
    log(f"classifier accuracy on real eval digits: {metrics['classifier_accuracy']:.4f}")
    with torch.no_grad():
        reconstruction = vae_decode(vae, encode_latent_stats(vae, evaluation.images)[0])
    metrics["vae_mse"] = F.mse_loss(reconstruction, evaluation.images).item()
    metrics["vae_accuracy"] = (classify(reconstruction, classifier) == evaluation.labels).float().mean().item()
    log(f"vae reconstruction MSE {metrics['vae_mse']:.5f}, classifier accuracy {metrics['vae_accuracy']:.4f}")

    prompts = evaluation_prompts(100)
    with torch.no_grad():
        embeds = text_encoder(tokenize(tokenizer, prompts))[0]
    metrics["teacher_steps"] = 25
    latents = ddim_sample(teacher, embeds, data.empty_embed, DEFAULT_GUIDANCE, 25, torch.Generator().manual_seed(args.seed))
    metrics["teacher_accuracy"] = digit_accuracy(vae_decode(vae, latents), prompts, classifier)
    log(f"teacher DDIM-25 CFG {DEFAULT_GUIDANCE} digit accuracy {metrics['teacher_accuracy']:.3f}")

    # 7. latent consistency distillation, then save the pipeline
    lcm_unet = distill_lcm(teacher, data, steps["lcm"], args.seed)
    save_pipeline(out / "lcm", clip_dir, text_encoder, vae, lcm_unet)
    log(f"saved the pipeline to {out / 'lcm'}")

    # 8. evaluation through the saved pipeline
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm")
    pipe.set_progress_bar_config(disable=True)
    metrics["lcm_samples"] = 200
    metrics["guidance_scales"] = [2.0, 4.0, 6.0, DEFAULT_GUIDANCE]
    prompts = evaluation_prompts(metrics["lcm_samples"])
    metrics["frechet_real"] = frechet_distance(train.images[:len(evaluation)], evaluation.images, classifier)
    noise = torch.rand(evaluation.images.shape, generator=torch.Generator().manual_seed(5))
    metrics["frechet_noise"] = frechet_distance(noise, evaluation.images, classifier)
    metrics["lcm"] = {}
    for guidance in metrics["guidance_scales"]:
        row = metrics["lcm"][str(guidance)] = {}
        for num_steps in (1, 2, 4, 8):
            images = sample_pipeline(pipe, prompts, num_steps, guidance, args.seed)
            row[str(num_steps)] = {"accuracy": digit_accuracy(images, prompts, classifier)}
            if num_steps == 4:
                row["4"]["frechet"] = frechet_distance(images, evaluation.images, classifier)
                if guidance == DEFAULT_GUIDANCE:
                    with torch.no_grad():
                        metrics["samples_clipscore"] = clip_reward(images, prompts).mean().item()
                        metrics["samples_aesthetic"] = aesthetic_reward(images, prompts).mean().item()
        log(f"lcm guidance {guidance}: " + " ".join(f"{k} steps {v['accuracy']:.3f}" for k, v in row.items())
            + f" | FD(4 steps) {row['4']['frechet']:.2f}")

    grid_prompts = [caption(d, s) for d in range(10) for s in STYLE_WORDS * 3]
    save_grid(sample_pipeline(pipe, grid_prompts, 4, DEFAULT_GUIDANCE, args.seed + 1), out / "samples_4step.png", columns=9)

    # 9. rewards on real digits
    metrics["clip_digit_ranking"] = ranking_accuracy(clip_reward, evaluation.images, evaluation.captions, other_digit)
    styled = [i for i, c in enumerate(evaluation.captions) if "thin" in c or "thick" in c]
    metrics["clip_thickness_ranking"] = ranking_accuracy(clip_reward, evaluation.images[styled],
                                                         [evaluation.captions[i] for i in styled], other_thickness)
    with torch.no_grad():
        image = clip_reward.image_embeds(evaluation.images)
        digit_texts = clip_reward.text_embeds([caption(d) for d in range(10)])
        metrics["clip_digit_accuracy"] = ((image @ digit_texts.T).argmax(-1) == evaluation.labels).float().mean().item()
        aesthetic = aesthetic_reward(evaluation.images, evaluation.captions)
        metrics["real_clipscore"] = clip_reward(evaluation.images, evaluation.captions).mean().item()
        metrics["real_aesthetic"] = aesthetic.mean().item()
    mass = evaluation.ink.flatten(1).mean(1)
    metrics["aesthetic_pearson"], metrics["aesthetic_spearman"] = pearson(aesthetic, mass), spearman(aesthetic, mass)
    log(f"clip ranking: other digit {metrics['clip_digit_ranking']:.3f}, other thickness "
        f"{metrics['clip_thickness_ranking']:.3f}, digit accuracy {metrics['clip_digit_accuracy']:.3f}; aesthetic vs "
        f"ink mass pearson {metrics['aesthetic_pearson']:.3f} spearman {metrics['aesthetic_spearman']:.3f}")

    seconds = time.time() - started
    metrics["build_seconds"] = seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_readme(out, metrics, args, seconds)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"done in {seconds / 60:.1f} min; {size / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
    main()
