"""CM-DPO: direct preference optimization of a latent consistency model on its sampling chains.

Seed: "Aligning Consistency Models by Preference Optimization" (no public code; this is the first implementation).
Each LCM step but the last is a Gaussian policy N(a_k f(x_k), s_k^2 I) (f_ref: the UNet with its LoRA off). On a
winner chain w and a loser chain l of one prompt, from online_pairs or OfflinePairs (derivation: docs/cm_dpo.md):

    L     = -log sigmoid(beta * sum_k [r_k(w) - r_k(l)]) + con_weight * L_con         dpo_loss, CmDpoObjective
    r_k   = w_k / 2D * (||x_{k-1} - a_k f_ref(x_k)||^2 - ||x_{k-1} - a_k f(x_k)||^2)   step_log_ratio
    w_k   = 1 / max(s_k^2, eps^2), the seed's weighting: the step's precision, floored  step_weight
    L_con = d(f(x_{t_{n+1}}), stopgrad f_target(x_{t_n})) on adjacent grid timesteps    consistency_loss

r_k averages over the D latent dims (one beta at any resolution); the seed's term (--dpo-form seed) pushes WINNERS away.

Run (GPU):  python cm_dpo.py --reward pickscore --train-steps 2000 --track   (or --pairs offline --pairs-file F.jsonl)
Run (CPU, about a minute, on the embedded digits world): README.md, "Each script on the CPU".
"""

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
import tyro

from common import REWARDS, load_reward, missing_local_directory

@dataclass
class Args:
    # algorithm
    pairs: Literal["online", "offline"] = "online"
    """where preference pairs come from: sampled from the current policy and ranked by --reward, or --pairs-file"""
    pairs_file: Optional[str] = None
    """offline pairs: JSONL, one {"prompt": ..., "winner": IMAGE, "loser": IMAGE} per line (paths relative to it)"""
    offline_chain: Literal["forward", "renoise"] = "forward"
    """offline pairs: chain through the images' latents by forward noising, or by re-noising the reference's steps"""
    reward: str = "pickscore"
    """online pairs: reward that ranks the samples, NAME or NAME=PATH; any reward of common.py (no gradient is taken)"""
    prompts_file: Optional[str] = None
    """online pairs: training prompts, one per line (unset: the repo's prompts/train.txt)"""
    samples_per_prompt: int = 2
    """online pairs: samples per prompt; the best and the worst form the pair"""
    reward_margin: float = 0.0
    """online pairs: leave pairs whose reward gap is below this out of L_DPO (ties always are)"""
    beta: Optional[float] = None
    """DPO temperature on the log-ratio per latent dimension (unset: 0.3 offline, 3 online: ~100x smaller margins)"""
    dpo_form: Literal["logratio", "seed"] = "logratio"
    """per-step term: the exact log-ratio, or the seed's literal divergence from the reference (pushes winners away)"""
    eps: float = 0.1
    """floor on the std in w_k = 1 / max(s_k^2, eps^2); the deterministic last step gets eps (t=19 has sigma 0.13)"""
    last_step: Literal["drop", "smooth", "constrain"] = "smooth"
    """deterministic last step: leave out, Gaussian with std --eps, or penalize mean((f_theta - f_ref)^2) there"""
    last_step_multiplier: float = 1.0
    """--last-step constrain: weight of the penalty (its starting value under dual ascent)"""
    dual_lr: float = 0.0
    """--last-step constrain: dual ascent rate, multiplier += dual_lr * (gap - budget) per step (0: fixed multiplier)"""
    last_step_budget: float = 1e-4
    """--last-step constrain with --dual-lr > 0: the allowed mean((f_theta - f_ref)^2) on the last step"""
    con_weight: float = 1.0
    """lambda, the weight of the consistency loss L_con (0: off)"""
    con_target: Literal["reference", "ema"] = "reference"
    """stop-gradient target of L_con: the base model, or an exponential moving average of the LoRA"""
    con_loss: Literal["l2", "huber"] = "l2"
    """L_con distance: mean squared error, or iCT's pseudo-Huber on the root-mean-square error"""
    ema_decay: float = 0.99
    """--con-target ema: decay of the moving average, updated after every optimizer step"""
    train_steps: int = 1000
    """number of optimizer steps"""
    batch_size: int = 4
    """preference pairs per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 6e-5
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    num_inference_steps: int = 8
    """K, the number of LCM sampling steps"""
    guidance_scale: float = 8.5
    """LCM guidance scale; the UNet is conditioned on w = guidance_scale - 1 (omega 7.5 in the paper)"""
    lora_rank: int = 16
    """LoRA rank on the UNet attention projections"""
    lora_alpha: int = 32
    """LoRA alpha (scale alpha / rank)"""

    # general
    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """hub id or local directory of a LatentConsistencyModelPipeline"""
    resolution: int = 512
    """image side in pixels (the paper trains at 512)"""
    gradient_checkpointing: bool = True
    """recompute each UNet call in the backward pass instead of storing its activations"""
    exp_name: str = Path(__file__).stem
    """name of this experiment (run directory and wandb run name)"""
    seed: int = 0
    """seed of the LoRA initialisation, the prompt draws and the sampling noise (all derived from seed and step)"""
    device: str = "cuda"
    """torch device to train on"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """autocast dtype; frozen weights are stored in it, LoRA weights stay fp32"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "cm-alignment"
    """wandb project name"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""
    output_dir: str = "runs"
    """where run directories (LoRA weights, sample grids, metrics) are written"""
    log_every: int = 1
    """print and log training metrics every this many optimizer steps"""
    eval_every: int = 100
    """evaluate on held-out prompts every this many optimizer steps (0: only at the start and end)"""
    eval_rewards: tuple[str, ...] = ("pickscore", "hpsv2", "clipscore", "aesthetic")
    """rewards scored on held-out prompts, NAME or NAME=PATH; ones that cannot be loaded are skipped with a warning"""
    eval_prompts_file: Optional[str] = None
    """held-out evaluation prompts, one per line (unset: the repo's prompts/eval.txt)"""
    eval_batch_size: int = 8
    """images per batch during evaluation"""
    save_every: int = 0
    """save a resumable checkpoint (LoRA + optimizer state) every this many optimizer steps (0: never)"""
    checkpoint_limit: int = 3
    """keep at most this many checkpoints (the oldest are deleted)"""
    resume: Optional[str] = None
    """continue from a checkpoint directory, or from the latest checkpoint of a run directory"""
    max_nonfinite_steps: int = 10
    """stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)"""

    def __post_init__(self):  # online pairs come from the policy itself: ~100x smaller margins (docs/cm_dpo.md)
        self.beta = (0.3 if self.pairs == "offline" else 3.0) if self.beta is None else self.beta


# --------------------------------------------------------------------------------------------
# ALGORITHM: the LCM sampling chain (identical in all four scripts)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def guidance_embedding(guidance_scale: float, dim: int, batch_size: int, device) -> torch.Tensor:
    """Embedding of w = guidance_scale - 1, the LCM's guidance input, as LatentConsistencyModelPipeline computes it."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = torch.full((batch_size, 1), guidance_scale - 1.0) * 1000.0 * frequencies[None, :]
    return torch.nn.functional.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2)).to(device)


@dataclass
class ChainStep:
    """One LCM step from timestep t: scalars on the chain, (B, 1, 1, 1) when t is (B,) (a step per sample). *_next:
    the noise towards t', which makes the step the policy N(alpha_next f, sigma_next^2 I); None on the last step."""
    t: torch.Tensor
    alpha: torch.Tensor  # sqrt(alphas_cumprod[t])
    sigma: torch.Tensor  # sqrt(1 - alphas_cumprod[t])
    c_skip: torch.Tensor  # the boundary-condition scalings of f = c_skip x + c_out x0_hat
    c_out: torch.Tensor
    alpha_next: Optional[torch.Tensor] = None
    sigma_next: Optional[torch.Tensor] = None


def chain_step(scheduler, t: torch.Tensor, t_next: Optional[torch.Tensor], device) -> ChainStep:
    """The step from t towards t_next (None: the last step), its coefficients as LCMScheduler.step computes them."""
    acp, scaled, sigma_data = scheduler.alphas_cumprod, t.cpu() * scheduler.config.timestep_scaling, 0.5
    values = dict(alpha=acp[t.cpu()].sqrt(), sigma=(1 - acp[t.cpu()]).sqrt(),
                  c_skip=sigma_data**2 / (scaled**2 + sigma_data**2), c_out=scaled / (scaled**2 + sigma_data**2) ** 0.5)
    if t_next is not None:
        values.update(alpha_next=acp[t_next.cpu()].sqrt(), sigma_next=(1 - acp[t_next.cpu()]).sqrt())
    shape = (-1, 1, 1, 1) if t.ndim else ()
    return ChainStep(t=t.to(device), **{name: value.reshape(shape).to(device) for name, value in values.items()})


def lcm_schedule(scheduler, num_steps: int, device) -> list[ChainStep]:
    """The K steps of the sampling chain, at the timesteps LatentConsistencyModelPipeline uses."""
    scheduler.set_timesteps(num_steps, device="cpu")
    timesteps = list(scheduler.timesteps)
    return [chain_step(scheduler, t, t_next, device) for t, t_next in zip(timesteps, timesteps[1:] + [None])]


def consistency_fn(unet, x: torch.Tensor, step: ChainStep, prompt_embeds, w_embedding) -> torch.Tensor:
    """f(x_t), the LCM's clean-latent estimate, as LCMScheduler.step computes it."""
    eps = unet(x, step.t, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding).sample
    x0_hat = (x - step.sigma * eps) / step.alpha
    return step.c_out * x0_hat + step.c_skip * x


def reference_fn(unet, x: torch.Tensor, step: ChainStep, prompt_embeds, w_embedding) -> torch.Tensor:
    """f_ref(x_t): the frozen base, the same UNet with its LoRA off (never a copy). The switch sits inside the function,
    so a gradient-checkpoint recomputation in the backward pass recomputes the reference too, not the policy."""
    unet.disable_adapters()
    try:
        return consistency_fn(unet, x, step, prompt_embeds, w_embedding)
    finally:
        unet.enable_adapters()


def unet_call(fn, checkpoint: bool, *inputs) -> torch.Tensor:
    """fn(*inputs), recomputed in the backward pass instead of storing its activations if checkpoint is set."""
    checkpointed = checkpoint and torch.is_grad_enabled()
    return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False) if checkpointed else fn(*inputs)


def draw_chain_noise(shape, num_steps: int, generator: torch.Generator, device) -> tuple[torch.Tensor, list]:
    """Initial latents, then one noise draw per stochastic step, in the pipeline's order."""
    draws = [torch.randn(shape, generator=generator, device=generator.device).to(device) for _ in range(num_steps)]
    return draws[0], draws[1:]


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], as the pipeline's postprocessing does."""
    return (vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# ALGORITHM: CM-DPO, the per-step log-ratio, L_DPO and L_con
# --------------------------------------------------------------------------------------------

def step_weight(variance, eps: float) -> torch.Tensor:
    """The seed's w_k = 1 / max(s_k^2, eps^2): the step's precision, floored so the deterministic last step counts."""
    return 1.0 / torch.clamp(torch.as_tensor(variance, dtype=torch.float32), min=eps**2)


def step_log_ratio(target: torch.Tensor, mean_policy: torch.Tensor, mean_ref: torch.Tensor, weight) -> torch.Tensor:
    """log N(target; mean_policy, 1/weight) - log N(target; mean_ref, 1/weight), summed over each sample's dimensions;
    as <mean_policy - mean_ref, 2 target - mean_policy - mean_ref> * weight / 2 it is exactly 0 while policy = ref."""
    mean_policy, mean_ref = mean_policy.float(), mean_ref.float()
    return weight * ((mean_policy - mean_ref) * (2 * target.float() - mean_policy - mean_ref)).flatten(1).sum(1) / 2


def step_divergence(mean_policy: torch.Tensor, mean_ref: torch.Tensor, weight) -> torch.Tensor:
    """weight / 2 * ||mean_policy - mean_ref||^2: the KL of the step's Gaussians, the seed's per-step term."""
    return weight * (mean_policy.float() - mean_ref.float()).square().flatten(1).sum(1) / 2


def dpo_loss(winner: torch.Tensor, loser: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: (-log sigmoid(margin), margin) with margin = beta * (winner - loser), the implicit reward margin."""
    margin = beta * (winner - loser)
    return torch.nn.functional.softplus(-margin), margin


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per sample: mean squared error, or iCT's pseudo-Huber / sqrt(dims): sqrt(mse + c^2) - c with c = 0.00054."""
    mse = (prediction.float() - target.float()).square().flatten(1).mean(1)
    return mse if kind == "l2" else (mse + 0.00054**2).sqrt() - 0.00054


@contextlib.contextmanager
def weights_replaced(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Temporarily load other values (the EMA) into the LoRA weights."""
    backup = [p.detach().clone() for p in params]
    try:
        for param, value in zip(params, values):
            param.detach().copy_(value)
        yield
    finally:
        for param, value in zip(params, backup):
            param.detach().copy_(value)


@dataclass
class PairBatch:
    """A micro-batch of b preference pairs: each state holds the b winners, then the b losers."""

    embeds: torch.Tensor  # (2b, tokens, dim), winners then losers
    states: list[torch.Tensor]  # K + 1 tensors (2b, C, H, W): x_K, ..., x_1, x_0
    keep: torch.Tensor  # (b,) float: 1 for pairs that enter L_DPO
    con_t: torch.Tensor  # (2b,) index n into the consistency grid: L_con compares t_{n+1} with t_n
    con_noise: torch.Tensor  # (2b, C, H, W) noise shared by both timesteps
    rewards: Optional[torch.Tensor] = None  # online: (b * samples_per_prompt,) every sample's reward
    gaps: Optional[torch.Tensor] = None  # online: (b,) winner minus loser reward


class CmDpoObjective(torch.nn.Module):
    """The loss of one micro-batch of pairs as a single forward: K policy and reference passes, L_con. Wrapping the
    whole objective (not the UNet) in DistributedDataParallel gives DDP the one forward per backward it expects."""

    def __init__(self, unet, scheduler, schedule: list[ChainStep], lora_params, ema: Optional[list], *, beta: float,
                 eps: float, dpo_form: str, last_step: str, con_weight: float, con_target: str, con_loss: str,
                 checkpoint: bool):
        super().__init__()
        self.unet, self.scheduler, self.schedule, self.lora_params = unet, scheduler, schedule, lora_params
        self.ema, self.beta, self.eps, self.dpo_form, self.last_step = ema, beta, eps, dpo_form, last_step
        self.con_weight, self.con_target, self.con_loss, self.checkpoint = con_weight, con_target, con_loss, checkpoint
        steps = scheduler.config.original_inference_steps  # L_con's grid: the distillation timesteps k-1, ..., T-1
        self.grid = torch.arange(1, steps + 1) * (scheduler.config.num_train_timesteps // steps) - 1

    def policy(self, x, step: ChainStep, embeds, w_embedding):
        return unet_call(consistency_fn, self.checkpoint, self.unet, x, step, embeds, w_embedding)

    def reference(self, x, step: ChainStep, embeds, w_embedding):
        with torch.no_grad():  # a constant of the loss: no graph, nothing to checkpoint
            return reference_fn(self.unet, x, step, embeds, w_embedding)

    def trajectory_terms(self, batch: PairBatch, w_embedding) -> dict:
        """Per chain (2b,): the per-step DPO terms (each a mean over latent dimensions) summed over steps, the
        exact KL of the stochastic steps (summed over dimensions), the last-step gap."""
        x = batch.states
        total = kl = last_gap = torch.zeros(len(x[0]), device=x[0].device)
        for i, step in enumerate(self.schedule[:-1] if self.last_step == "drop" else self.schedule):
            last = step.alpha_next is None
            f_policy = self.policy(x[i], step, batch.embeds, w_embedding)
            f_ref = self.reference(x[i], step, batch.embeds, w_embedding)
            if last and self.last_step == "constrain":
                last_gap = (f_policy.float() - f_ref.float()).square().flatten(1).mean(1)
                break
            # p(x_{k-1} | x_k) = N(a f(x_k), s^2 I); the deterministic last step: a = 1, s = 0 (w_k floors s at eps)
            a, variance = (1.0, 0.0) if last else (step.alpha_next, step.sigma_next**2)
            weight = step_weight(variance, self.eps).to(x[0].device)
            term = (step_log_ratio(x[i + 1], a * f_policy, a * f_ref, weight) if self.dpo_form == "logratio"
                    else step_divergence(a * f_policy, a * f_ref, weight))
            total = total + term / x[0][0].numel()  # a mean over the latent: beta means the same at every resolution
            kl = kl if last else kl + step_divergence(a * f_policy.detach(), a * f_ref, 1.0 / variance)
        return {"total": total, "kl": kl, "last_gap": last_gap}

    def consistency_gap(self, x_high, high: ChainStep, x_low, low: ChainStep, embeds, w_embedding) -> torch.Tensor:
        """d(f_theta(x_high), stopgrad f_target(x_low)) per sample, the target being the reference or the EMA."""
        if self.con_target == "reference":
            target = self.reference(x_low, low, embeds, w_embedding)
        else:
            with torch.no_grad(), weights_replaced(self.lora_params, self.ema):
                target = consistency_fn(self.unet, x_low, low, embeds, w_embedding)
        return consistency_loss(self.policy(x_high, high, embeds, w_embedding), target, self.con_loss)

    def forward(self, batch: PairBatch, w_embedding, multiplier: float):
        """Returns (loss, statistics per pair or chain, detached, named as their train/ metrics; None: not used)."""
        con, clean = None, batch.states[-1]
        if self.con_weight > 0:  # first: the EMA target swaps weights in place, before the graph saves them
            # L_con on the final latents, noised to adjacent grid timesteps t_{n+1} > t_n with the same z
            low, high = [chain_step(self.scheduler, self.grid[batch.con_t + j], None, clean.device) for j in (0, 1)]
            x_low, x_high = [step.alpha * clean + step.sigma * batch.con_noise for step in (low, high)]
            con = self.consistency_gap(x_high, high, x_low, low, batch.embeds, w_embedding)
        terms = self.trajectory_terms(batch, w_embedding)
        pair_loss, margin = dpo_loss(*terms["total"].chunk(2), self.beta)
        constrain, kept = self.last_step == "constrain", batch.keep.bool()
        # skipped pairs weigh zero but still count in the mean: the step does not grow when few survive
        loss = ((pair_loss * batch.keep).mean() + (0 if con is None else self.con_weight * con.mean())
                + (multiplier * terms["last_gap"].mean() if constrain else 0))
        return loss, {"loss": loss.detach().reshape(1), "loss_dpo": pair_loss.detach()[kept],
                      "implicit_margin": margin.detach()[kept], "loss_con": None if con is None else con.detach(),
                      "kl": terms["kl"].detach(), "last_step_gap": terms["last_gap"].detach() if constrain else None}


# --------------------------------------------------------------------------------------------
# ALGORITHM: the preference pairs, sampled online or read from a file
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_trajectory(unet, latents, noises, schedule: list[ChainStep], embeds, w_embedding) -> list[torch.Tensor]:
    """The K-step chain as LatentConsistencyModelPipeline runs it; states [x_K, ..., x_0], schedule[i]: i -> i + 1."""
    states = [latents]
    for k, step in enumerate(schedule):
        denoised = consistency_fn(unet, states[-1], step, embeds, w_embedding)
        states.append(denoised if step.alpha_next is None else step.alpha_next * denoised + step.sigma_next * noises[k])
    return states


def pair_indices(seed: int, batch_size: int, num_items: int, step: int, micro: int, rank: int, world_size: int):
    """This rank's slice of the global micro-batch, (global pair index, item index): every draw of a pair is seeded by
    its global index, so N ranks with batch b see exactly the pairs one process with batch N*b sees."""
    chosen = random.Random(derived_seed(seed, step, micro)).choices(range(num_items), k=batch_size * world_size)
    return [(i, chosen[i]) for i in range(rank * batch_size, (rank + 1) * batch_size)]


def pair_generator(seed: int, step: int, micro: int, index: int, use: int, device) -> torch.Generator:
    """use 0: the pair's chain noise; use 1: its L_con timesteps and noise."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step, micro, index, use))


def consistency_draws(seed: int, step: int, micro: int, items: list[tuple], grid_size: int, latent_shape, device):
    """PairBatch's con_t and con_noise: per pair of items (pair_indices), the winner's and the loser's L_con draws."""
    generators = [pair_generator(seed, step, micro, i, 1, device) for i, _ in items]
    t = torch.stack([torch.randint(0, grid_size - 1, (2,), generator=g, device=g.device).cpu() for g in generators], 1)
    noise = torch.stack([torch.randn((2, *latent_shape), generator=g, device=g.device) for g in generators], 1)
    return {"con_t": t.flatten(), "con_noise": noise.flatten(0, 1).to(device)}


@torch.no_grad()
def online_pairs(models, reward_fn, schedule, prompts: list[str], step: int, micro: int, rank: int, world_size: int,
                 latent_shape, w_row, grid_size: int, device, autocast, *, seed: int, batch_size: int,
                 samples_per_prompt: int, reward_margin: float) -> PairBatch:
    """Sample every prompt samples_per_prompt times from the current policy; best and worst become a pair."""
    tokenizer, text_encoder, vae, unet = models
    items, n = pair_indices(seed, batch_size, len(prompts), step, micro, rank, world_size), samples_per_prompt
    chosen = [prompts[j] for _, j in items]
    draws = [draw_chain_noise((n, *latent_shape), len(schedule), pair_generator(seed, step, micro, i, 0, device),
                              device) for i, _ in items]
    latents = torch.cat([latent for latent, _ in draws])  # pair-major: pair 0's n samples, pair 1's, ...
    noises = [torch.cat(per_step) for per_step in zip(*[noise for _, noise in draws])]
    with autocast:
        embeds = encode_prompts(tokenizer, text_encoder, chosen)
        states = sample_trajectory(unet, latents, noises, schedule, embeds.repeat_interleave(n, 0),
                                   w_row.expand(len(latents), -1))
        rewards = reward_fn(decode(vae, states[-1]), [prompt for prompt in chosen for _ in range(n)]).float()
    grouped = rewards.view(len(chosen), n)
    gaps, rows = grouped.amax(1) - grouped.amin(1), torch.arange(len(chosen), device=rewards.device) * n
    order = torch.cat([rows + grouped.argmax(1), rows + grouped.argmin(1)]).to(device)  # winners, then losers
    keep = ((gaps > 0) & (gaps >= reward_margin)).float().to(device)
    return PairBatch(embeds=torch.cat([embeds, embeds]), states=[s[order] for s in states], keep=keep, rewards=rewards,
                     gaps=gaps, **consistency_draws(seed, step, micro, items, grid_size, latent_shape, device))


class OfflinePairs:
    """The --pairs-file pairs (read_pairs): each image is VAE-encoded once and its latent kept (on the CPU)."""

    def __init__(self, records: list[dict], *, resolution: int, offline_chain: str, seed: int, batch_size: int):
        self.records, self.latents = records, {}
        self.resolution, self.offline_chain, self.seed, self.batch_size = resolution, offline_chain, seed, batch_size

    def latent(self, vae, path: str, line: int) -> torch.Tensor:
        """The image resized and center-cropped, as its VAE posterior mean (not a sample: resumed runs are the same)."""
        from PIL import Image, ImageOps
        if path not in self.latents:
            image = open_image(path, self.resolution, f"pairs file line {line}: image '{path}'")
            pixels = np.asarray(ImageOps.fit(image, (self.resolution,) * 2, Image.BICUBIC), dtype=np.float32)
            pixels = (torch.from_numpy(pixels) / 127.5 - 1).permute(2, 0, 1)[None].to(vae.device, vae.dtype)
            self.latents[path] = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)[0].float().cpu()
        return self.latents[path]

    @torch.no_grad()
    def batch(self, models, schedule, step: int, micro: int, rank: int, world_size: int, latent_shape, w_row,
              grid_size: int, device, autocast) -> PairBatch:
        """Encode this rank's pairs and build their approximate chains (--offline-chain), noise shared by each pair."""
        tokenizer, text_encoder, vae, unet = models
        items = pair_indices(self.seed, self.batch_size, len(self.records), step, micro, rank, world_size)
        records = [self.records[j] for _, j in items]
        clean = torch.stack([self.latent(vae, r[key], r["line"]) for key in ("winner", "loser") for r in records])
        noise = [torch.randn((len(schedule), *latent_shape), device=device,
                             generator=pair_generator(self.seed, step, micro, i, 0, device)) for i, _ in items]
        noise = torch.stack(noise + noise, dim=1)  # (K, 2b, ...): the winner and loser of a pair share it
        with autocast:
            embeds = torch.cat(2 * [encode_prompts(tokenizer, text_encoder, [r["prompt"] for r in records])])
        clean, w = clean.to(device), w_row.expand(len(embeds), -1)
        states = [schedule[0].alpha * clean + schedule[0].sigma * noise[0]]  # x_K: the clean latent, noised
        for i, previous in enumerate(schedule[:-1], start=1):
            with autocast:  # forward: the clean latent noised again; renoise: the reference's step from the last state
                mean = clean if self.offline_chain == "forward" else reference_fn(unet, states[-1], previous, embeds, w)
            states.append(previous.alpha_next * mean.float() + previous.sigma_next * noise[i])
        return PairBatch(embeds=embeds, states=[*states, clean], keep=torch.ones(len(records), device=device),
                         **consistency_draws(self.seed, step, micro, items, grid_size, latent_shape, device))


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    validate(args)
    offline_if_hub_unreachable([args.model, args.reward, *args.eval_rewards])
    online = args.pairs == "online"
    offline = OfflinePairs(read_pairs(args.pairs_file, args.resolution), resolution=args.resolution, seed=args.seed,
                           offline_chain=args.offline_chain, batch_size=args.batch_size) if not online else None
    train_prompts = read_prompts(args.prompts_file or PROMPTS_DIR / "train.txt") if online else \
        [record["prompt"] for record in offline.records]
    eval_prompts = read_prompts(args.eval_prompts_file or PROMPTS_DIR / "eval.txt", "--eval-prompts-file")
    run = Run(args)  # rank and device; a --resume checkpoint is checked and its directory locked before models load
    if run.resumed and args.con_target == "ema" and args.con_weight > 0 and run.resumed["ema"] is None:
        raise SystemExit(f"error: '{run.resumed['path']}' was trained without --con-target ema; resume with its flags")

    # ---- models: the LCM with a LoRA (the policy; the reference is the same UNet with the LoRA off), the rewards
    tokenizer, text_encoder, vae, unet, scheduler = load_lcm(args.model, run.device, run.dtype)
    models = (tokenizer, text_encoder, vae, unet)
    latent_shape = check_model(args, tokenizer, vae, unet, scheduler, train_prompts + eval_prompts, run.is_main)
    reward_fn = load_reward_spec(args.reward, run.device, run.dtype) if online else None  # ranks the online samples
    eval_rewards = load_eval_rewards(args.eval_rewards, run.dtype) if run.is_main else {}
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    ema = [p.detach().clone() for p in lora_params] if args.con_target == "ema" and args.con_weight > 0 else None
    optimizer = torch.optim.AdamW(lora_params, args.lr, weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, run.device)
    objective = CmDpoObjective(unet, scheduler, schedule, lora_params, ema, beta=args.beta, eps=args.eps,
                               dpo_form=args.dpo_form, last_step=args.last_step, checkpoint=args.gradient_checkpointing,
                               con_weight=args.con_weight, con_target=args.con_target, con_loss=args.con_loss)
    grid_size, multiplier, constrain = len(objective.grid), args.last_step_multiplier, args.last_step == "constrain"
    w_row = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, 1, run.device)
    pairs_per_step = args.batch_size * args.grad_accum * run.world_size
    images_per_step = pairs_per_step * (args.samples_per_prompt if online else 2)  # offline: 2 read, none scored
    source = (f"online, best and worst of {args.samples_per_prompt} samples per prompt" if online
              else f"offline, {len(offline.records)} pairs in {args.pairs_file}")
    start_step, objective = run.begin(unet, optimizer, objective, f"{args.batch_size} x {args.grad_accum} accumulation "
                                      f"x {run.world_size} ranks = {pairs_per_step} pairs ({source})")
    if run.resumed:  # cm_dpo's own state: the last-step multiplier and the EMA of the LoRA
        multiplier = run.resumed["multiplier"]
        for average, value in zip(ema or [], run.resumed["ema"] or []):
            average.copy_(value)

    def sample(latents, noises, embeds, w_embedding):  # the policy's final latents, for evaluation
        return sample_trajectory(unet, latents, noises, schedule, embeds, w_embedding)[-1]

    def evaluate_now(step: int) -> None:
        run.evaluate(step, sample, models, eval_prompts, eval_rewards, latent_shape, len(schedule))

    def pair_batch(step: int, micro: int) -> PairBatch:
        where = (step, micro, run.rank, run.world_size, latent_shape, w_row, grid_size, run.device, run.autocast)
        if online:
            return online_pairs(models, reward_fn, schedule, train_prompts, *where, seed=args.seed,
                                batch_size=args.batch_size, samples_per_prompt=args.samples_per_prompt,
                                reward_margin=args.reward_margin)
        return offline.batch(models, schedule, *where)

    def gathered(name: str) -> float:  # this step's mean of a statistic over every rank's micro-batches
        return global_mean(torch.cat([s[name] for s in stats]), run.world_size)

    if start_step == 0:
        evaluate_now(0)
    for step in range(start_step + 1, args.train_steps + 1):
        unet.train()
        started = time.perf_counter()
        run.snapshot(step - 1, multiplier=multiplier, ema=ema)  # kept while these weights are the last finite ones
        stats, finite = [], True
        for micro in range(args.grad_accum):
            # around the sampling too: running out of memory there is the same one line
            with run.backward_pass(objective, step, last=micro == args.grad_accum - 1):
                # ---- sample: this micro-batch's pairs (online: best and worst of the current policy's samples)
                batch = pair_batch(step, micro)
                # ---- loss: L_DPO + con_weight * L_con (+ the last-step penalty), one forward
                with run.autocast:
                    loss, micro_stats = objective(batch, w_row.expand(len(batch.embeds), -1), multiplier)
                finite &= torch.isfinite(loss).item()
                run.grad_scaler.scale(loss / args.grad_accum).backward()
            stats.append({**micro_stats, "implicit_accuracy": (micro_stats["implicit_margin"] > 0).float(),
                          "kept_pairs": batch.keep, "reward": batch.rewards, "reward_gap": batch.gaps})
        # ---- update: skipped on every rank together when a loss or a gradient is not finite; then EMA, dual ascent
        grad_norm = run.update(step, finite, lora_params, args.max_grad_norm)
        if grad_norm is not None and ema is not None:
            for average, param in zip(ema, lora_params):
                average.lerp_(param.detach(), 1 - args.ema_decay)
        if grad_norm is not None and constrain and args.dual_lr > 0:
            # every rank sees the same global gap, so the multiplier stays identical across ranks
            multiplier = max(0.0, multiplier + args.dual_lr * (gathered("last_step_gap") - args.last_step_budget))
        step_time = time.perf_counter() - started
        # ---- log: every statistic in use (online: the rewards, --last-step constrain: the gap and the multiplier)
        if grad_norm is not None and step % args.log_every == 0:
            means = {name: gathered(name) for name, value in stats[0].items() if value is not None}
            means.update(divergence=means["kl"], grad_norm=grad_norm, **{"multiplier": multiplier} if constrain else {})
            text = (("reward {reward:.4f} " if online else "") + "loss_dpo {loss_dpo:.4f} margin {implicit_margin:.4f} "
                    "accuracy {implicit_accuracy:.2f} kl {kl:.4f} loss {loss:.4f}").format_map(means)
            run.log_step(step, {f"train/{name}": value for name, value in means.items()},
                         f"{text} | {pairs_per_step / step_time:.2f} pairs/s", step_time, images_per_step,
                         images_per_step if online else 0)
        # ---- save and evaluate
        run.save(step, multiplier=multiplier, ema=ema)
        if args.eval_every and step % args.eval_every == 0 and step != args.train_steps:
            evaluate_now(step)
    run.finish(lora_params, lambda: evaluate_now(args.train_steps))


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE (cm_dpo only): the flags that define a run, the checks of the flags, offline pair files
# --------------------------------------------------------------------------------------------

# flags --resume keeps (global_batch, --batch-size x ranks, fixes the sample stream); all others may change
RUN_FLAGS = ("model", "reward", "resolution", "num_inference_steps", "guidance_scale", "lora_rank", "lora_alpha",
             "seed", "global_batch", "grad_accum", "pairs", "pairs_file", "offline_chain", "samples_per_prompt",
             "dpo_form", "last_step", "con_target")
OOM_FIX = ("lower --batch-size (raise --grad-accum to keep the effective batch), lower --samples-per-prompt, keep "
           "--gradient-checkpointing, or lower --resolution")


def validate(args: Args) -> None:
    """Reject impossible settings with a one-line message before anything is loaded."""
    validate_shared(args, [
        (args.num_inference_steps == 1 and args.last_step != "smooth", f"--last-step {args.last_step} leaves no step "
         "to compare with --num-inference-steps 1; use --last-step smooth"),
        (args.pairs == "offline" and not args.pairs_file,
         "--pairs offline needs --pairs-file (JSONL of prompt, winner, loser)"),
        (not 0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1) (got {args.ema_decay})"),
    ], beta="> 0", eps="> 0", samples_per_prompt=">= 2", reward_margin=">= 0", con_weight=">= 0",
        last_step_multiplier=">= 0", dual_lr=">= 0", last_step_budget=">= 0")


def read_pairs(path: str | Path, resolution: int) -> list[dict]:
    """[{"prompt", "winner", "loser", "line"}], image paths resolved against the file's directory. Every line is checked
    and every image decoded (open_image) here, so a bad line stops the run with its number before any model loads."""
    path, fix = Path(path), 'write one {"prompt": ..., "winner": ..., "loser": ...} object per line'
    if not path.is_file():
        raise SystemExit(f"error: --pairs-file '{path}' does not exist; pass a JSONL file of prompt/winner/loser")
    pairs, checked, fields = [], set(), ("prompt", "winner", "loser")
    for number, line in enumerate(read_text(path, "--pairs-file", fix).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: --pairs-file '{path}' line {number} is not valid JSON ({error.msg}); {fix}")
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in fields):
            raise SystemExit(f"error: --pairs-file '{path}' line {number} needs string fields prompt, winner and loser")
        pair = {"prompt": record["prompt"], "line": number}
        for key in ("winner", "loser"):
            pair[key] = image = str(path.parent / record[key])
            if image not in checked:
                open_image(image, resolution, f"--pairs-file '{path}' line {number}: {key} image '{image}'").close()
                checked.add(image)
        pairs.append(pair)
    if not pairs:
        raise SystemExit(f"error: --pairs-file '{path}' has no pairs; write one JSON object per line")
    return pairs


def open_image(path: str, resolution: int, where: str, max_aspect: int = 4, min_side_divisor: int = 8):
    """The image decoded to RGB (PIL), or a one-line error starting with `where`. Refused from its header, before
    decoding: more pixels than PIL's decompression-bomb limit (bounding the memory), or too far from a square."""
    from PIL import Image
    try:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {where} does not exist; fix the path (relative paths start at the JSONL file's "
                             "directory)")
        if os.path.getsize(path) == 0:
            raise SystemExit(f"error: {where} is empty (0 bytes); fix or remove the line")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice its limit
            with Image.open(path) as image:
                short, long = sorted(image.size)
                if long > max_aspect * short or short * min_side_divisor < resolution:
                    raise SystemExit(f"error: {where} is {image.width}x{image.height} pixels, too far from the "
                                     f"training resolution {resolution}x{resolution} (refused: an aspect ratio above "
                                     f"{max_aspect} or a shorter side below {resolution / min_side_divisor:g} = "
                                     f"resolution / {min_side_divisor}); crop or resize it, or remove the line")
                return image.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise SystemExit(f"error: {where} is too large to decode ({error}); resize it or remove the line")
    except Exception as error:  # PIL raises several types for unreadable or truncated files
        raise SystemExit(f"error: {where} cannot be read as an image ({error}); fix or remove the line")


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE: loading, runs and checkpoints, ranks, evaluation and logging (identical in all four scripts)
# --------------------------------------------------------------------------------------------

class Run:
    """This process's share of a run (ranks, mixed precision, locked run directory, non-finite guard, logging,
    evaluation, saving); built before any model loads."""

    def __init__(self, args, unit: str = "step"):
        self.args, self.unit, self.started = args, unit, time.time()
        self.rank, self.world_size, self.device = 0, int(os.environ.get("WORLD_SIZE", "1")), torch.device(args.device)
        if self.world_size > 1:  # started by torchrun, whose environment variables name the process group
            if args.device.startswith("cuda"):
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.record = {"script": Path(__file__).name, "args": {**asdict(args), "world_size": self.world_size,
                                                               "global_batch": args.batch_size * self.world_size}}
        self.resumed, self.lock = prepare_run(args, self.record, self.is_main)
        self.dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=args.mixed_precision != "no")
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=args.mixed_precision == "fp16")
        self.nonfinite_fix = "lower --lr or use --mixed-precision bf16/no"  # what a non-finite stop advises
        self.good = self.pending = None  # training states: the newest with a finite loss; this update's start
        self.in_a_row, self.skipped, self.scores, self.scored_step, self.wandb = 0, 0, {}, None, None
        torch.manual_seed(args.seed)

    def begin(self, unet, optimizer, objective, batch_text: str):
        """Resume (the script restores its own extra state from self.resumed) or make a new run directory; returns
        (the step it starts after, the objective wrapped for DDP)."""
        self.unet, self.optimizer, resumed, args = unet, optimizer, self.resumed or {}, self.args
        self.start_step, self.started = resumed.get("step", 0), self.started - resumed.get("elapsed_s", 0.0)
        if resumed:
            set_lora(unet, resumed["lora"])
            optimizer.load_state_dict(resumed["optimizer"])
            for group in optimizer.param_groups:  # the saved groups hold the values the checkpoint was trained with
                group.update(lr=args.lr, weight_decay=args.weight_decay)
            if resumed["grad_scaler"] and self.grad_scaler.is_enabled():  # a loss scale exists only under fp16
                self.grad_scaler.load_state_dict(resumed["grad_scaler"])
            self.run_dir = resumed["path"].parent.parent
            if self.is_main:  # args.json keeps the flags the run started with; each resume appends its own
                with (self.run_dir / "resumes.jsonl").open("a") as f:
                    f.write(json.dumps({"step": self.start_step, "checkpoint": str(resumed["path"]),
                                        "changed": resumed["changed"], "args": asdict(args)}) + "\n")
        else:
            self.run_dir = new_run_dir(args, self.is_main, self.world_size)
            if self.is_main:
                self.lock = lock_run_dir(self.run_dir)
                (self.run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        if self.world_size > 1:  # gradients of the LoRA weights (the only trainable ones) are all-reduced
            objective = torch.nn.parallel.DistributedDataParallel(
                objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        if self.is_main:
            resumed_at = f" (resumed at {self.unit} {self.start_step})" if resumed else ""
            print(f"run directory: {self.run_dir}{resumed_at}\neffective batch: {batch_text} per {self.unit}")
            if args.track:  # a resumed run continues its wandb run, whose id is kept in the run directory
                import wandb
                id_file = self.run_dir / "wandb_run_id.txt"
                id_file.write_text(wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args),
                                              name=self.run_dir.name, resume="allow",
                                              id=id_file.read_text().strip() if id_file.exists() else None).id)
                self.wandb = wandb
        self.loop_started = time.perf_counter()
        return self.start_step, objective

    def state(self, step: int, **extra) -> dict:
        return training_state(step, self.unet, self.optimizer, self.grad_scaler,
                              {**self.record, "elapsed_s": time.time() - self.started}, **extra)

    def snapshot(self, step: int, **extra) -> None:
        """Keep the state at the start of an update: it becomes the good one once the update's loss is finite."""
        self.pending = self.state(step, **extra)

    @contextlib.contextmanager
    def backward_pass(self, objective, step: int, last: bool = True):
        """Around a micro-batch's forward and backward: DDP all-reduces only in the last; out of memory is one line."""
        try:
            with contextlib.nullcontext() if last or self.world_size == 1 else objective.no_sync():
                yield
        except torch.OutOfMemoryError:
            raise SystemExit(f"error: out of memory at {self.unit} {step}; {OOM_FIX}")

    def update(self, step: int, finite: bool, params, max_grad_norm: float) -> Optional[float]:
        """Clip and step, or skip the update on all ranks if any rank's loss or gradient was not finite (a non-finite
        loss still ran backward, so the ranks' all-reduces stay aligned). Returns the gradient norm, None if skipped."""
        self.grad_scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        ok = torch.tensor(float(finite and torch.isfinite(grad_norm)), device=self.device)
        finite = global_mean(ok, self.world_size) == 1  # on every rank, so that all ranks step or all skip
        if finite:
            self.good, self.pending, self.in_a_row = self.pending or self.good, None, 0
            self.grad_scaler.step(self.optimizer)
        else:
            self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
            if self.is_main:
                print(f"warning: {self.unit} {step}: non-finite loss or gradient, update skipped "
                      f"({self.in_a_row} in a row)")
                self.log({"train/skipped_steps": self.skipped}, step)
        self.grad_scaler.update()  # after a skip under fp16 this lowers the loss scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.in_a_row >= self.args.max_nonfinite_steps:
            self.stop(f"{self.in_a_row} non-finite steps in a row at {self.unit} {step}")
        return grad_norm.item() if finite else None

    def stop(self, what: str) -> None:
        """Exit naming the checkpoint to resume from: the last finite weights, saved if their step has none."""
        target = self.good and self.run_dir / "checkpoints" / f"step_{self.good['step']:06d}"
        if self.good:
            self.restore_last_finite()
            if self.is_main and not (target / "training_state.pt").is_file():
                target = save_checkpoint(self.run_dir, self.unet, self.good, None) and target
        if not target:
            raise SystemExit(f"error: {what}; no step had a finite loss, so nothing was saved; {self.nonfinite_fix}")
        raise SystemExit(f"error: {what}; the last weights with a finite loss are in {target}; {self.nonfinite_fix}, "
                         f"and continue with --resume {target}")

    def restore_last_finite(self) -> None:
        """Back to the newest weights with a finite loss; newer checkpoints become step_N.nonfinite: one saved right
        after the update that broke the weights (no loss had shown it yet) must not be what --resume RUN_DIR picks."""
        set_lora(self.unet, self.good["lora"])
        for path in sorted((self.run_dir / "checkpoints").glob("step_[0-9]*[0-9]")):
            if self.is_main and int(path.name.removeprefix("step_")) > self.good["step"]:
                path.rename(path.with_name(path.name + ".nonfinite"))
                print(f"warning: {path} holds weights that gave no finite loss; renamed it {path.name}.nonfinite")

    def log(self, metrics: dict, step: int, media: Optional[dict] = None) -> None:
        """Scalars to metrics.jsonl (and wandb); media (wandb objects) to wandb only."""
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb:
            self.wandb.log({**metrics, **(media or {})}, step=step)

    def log_step(self, step: int, metrics: dict, text: str, step_time: float, images: int, queries: int) -> None:
        """Print a step's line with its throughput, elapsed time and ETA; log it with the run's cost so far (the x
        axes of reward-versus-compute curves, over all ranks: images trained on, reward queries, seconds)."""
        if not self.is_main:
            return
        elapsed, steps_done = time.time() - self.started, max(step - self.start_step, 1)
        eta = (time.perf_counter() - self.loop_started) / steps_done * (self.args.train_steps - step)
        clock = [f"{int(s) // 3600}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}" for s in (elapsed + 0.5, eta + 0.5)]
        print(f"{self.unit} {step}/{self.args.train_steps} {text} | {images / step_time:.2f} samples/s | "
              f"elapsed {clock[0]} eta {clock[1]}")
        metrics.update({"perf/step_time_s": step_time, "perf/samples_per_s": images / step_time,
                        "perf/train_images": step * images, "perf/reward_queries": step * queries,
                        "perf/elapsed_s": elapsed})
        if self.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log(metrics, step)

    @torch.no_grad()
    def evaluate(self, step: int, sample, models, prompts: list[str], rewards: dict, latent_shape: tuple,
                 num_steps: int) -> None:
        """Sample the held-out prompts with a fixed seed (sample(latents, noises, embeds, w_embedding): the
        script's chain -> final latents), score them with every evaluation reward, save the grid, log the means."""
        if self.is_main:
            (tokenizer, text_encoder, vae, unet), args = models, self.args
            unet.eval()
            print(f"evaluating {len(prompts)} prompts...", flush=True)
            generator = torch.Generator(device=self.device).manual_seed(args.seed + 1_000_003)
            images, scores = [], {name: [] for name in rewards}
            for batch in (prompts[i:i + args.eval_batch_size] for i in range(0, len(prompts), args.eval_batch_size)):
                latents, noises = draw_chain_noise((len(batch), *latent_shape), num_steps, generator, self.device)
                with self.autocast:
                    embeds = encode_prompts(tokenizer, text_encoder, batch)
                    w = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, len(batch), self.device)
                    batch_images = decode(vae, sample(latents, noises, embeds, w))
                    for name, reward in rewards.items():  # kept on the CPU between evaluations
                        scores[name].append(reward.to(self.device)(batch_images, batch).float().cpu())
                images.append(batch_images.cpu())
            for reward in rewards.values():
                reward.to("cpu")
            grid = self.run_dir / "samples" / f"step_{step:06d}.png"
            save_image_grid(torch.cat(images), grid)
            self.scores = {f"eval/{name}": torch.cat(values).mean().item() for name, values in scores.items()}
            self.scored_step = step
            print(f"eval {self.unit} {step}: " + " ".join(f"{k}={v:.4f}" for k, v in self.scores.items()))
            # the grid as one image file: wandb stores its PNG (images inside a wandb.Table were stored as text)
            self.log(self.scores, step, self.wandb and {"eval/samples": self.wandb.Image(
                str(grid), caption=f"{self.unit} {step}: " + " | ".join(prompts))})
        if self.world_size > 1:
            dist.barrier()

    def save(self, step: int, **extra) -> None:
        """The periodic checkpoint, if one is due; never after a non-finite loss, which came from these weights."""
        if self.args.save_every and step % self.args.save_every == 0 and not self.in_a_row:
            if self.is_main:
                save_checkpoint(self.run_dir, self.unet, self.state(step, **extra), self.args.checkpoint_limit)
            if self.world_size > 1:
                dist.barrier()

    def finish(self, params, final_evaluation) -> None:
        """Last finite weights after a non-finite streak, ranks compared, final evaluation, LoRA with a model card."""
        if self.in_a_row and self.good:
            self.restore_last_finite()
            if self.is_main:
                print(f"warning: the run ended with {self.in_a_row} non-finite steps in a row; final/ holds the "
                      f"weights of {self.unit} {self.good['step']}, the last with a finite loss")
        if self.world_size > 1:  # they cannot drift apart while gradients are all-reduced: fail loudly if they did
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            extremes = torch.stack([flat, -flat])  # each weight's max and -min over the ranks, in one all-reduce
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            if not torch.equal(extremes[0], -extremes[1]):
                raise SystemExit(f"error: the LoRA weights differ across ranks (max gap {extremes.sum(0).max():.3g})")
            if self.is_main:
                print(f"LoRA weights identical on all {self.world_size} ranks")
        if self.args.train_steps > self.start_step:
            final_evaluation()
        if self.is_main:
            final_dir = save_final(self.unet, self.run_dir)
            write_model_card(final_dir, self.args, self.scores, self.scored_step)
            print(f"saved LoRA to {final_dir} (with a model card, README.md, and args.json)")
            if self.wandb:
                self.wandb.finish()
        if self.world_size > 1:
            dist.destroy_process_group()


def offline_if_hub_unreachable(sources: list[str], timeout: float = 3.0) -> None:
    """Set HF_HUB_OFFLINE=1 (local cache only) if the hub is unreachable, not minutes of retries per download; not if
    set, all sources (NAME=PATH or paths) local, or behind a proxy. Call first: huggingface_hub reads it at import."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
            all(Path(source.partition("=")[2] or source).exists() for source in sources) or \
            any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)),
                                 timeout=timeout).close()
    except OSError:
        print(f"warning: the Hugging Face hub ({endpoint.hostname}) is unreachable; loading from the local cache "
              "only, as with HF_HUB_OFFLINE=1", flush=True)
        os.environ["HF_HUB_OFFLINE"] = "1"


def load_lcm(model: str, device: torch.device, weight_dtype: torch.dtype):
    """Load tokenizer, text encoder, VAE, UNet and scheduler of an LCM pipeline, frozen, in weight_dtype."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()  # per-file progress bars would bury the run's own lines
    transformers_logging.disable_progress_bar()
    try:
        # the UNet's config first (one small file): an unsupported family is refused before any weights load
        unet_config = UNet2DConditionModel.load_config(model, subfolder="unet")
        if unet_config.get("addition_embed_type") == "text_time" or (Path(model) / "text_encoder_2").is_dir():
            raise SystemExit(f"error: '{model}' is an SDXL-style LCM (two text encoders, text_time conditioning); "
                             "SDXL-style LCMs are not supported (yet); pass an SD1.5-style LCM such as "
                             "SimianLuo/LCM_Dreamshaper_v7")
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        text_encoder, vae, unet = (cls.from_pretrained(model, subfolder=folder, torch_dtype=weight_dtype)
                                   for cls, folder in ((CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae"),
                                                       (UNet2DConditionModel, "unet")))
        scheduler = LCMScheduler.from_pretrained(model, subfolder="scheduler")
    except Exception as error:  # hub and file errors come in many types; all mean the same here
        raise SystemExit(f"error: could not load the LCM pipeline from '{model}' ({first_line(error)}); pass --model "
                         "a local pipeline directory, or a hub id that is reachable or already in the cache (offline "
                         "machines: set HF_HUB_OFFLINE=1 and pass local directories)")
    if unet.config.time_cond_proj_dim is None:
        raise SystemExit(f"error: '{model}' has no guidance-conditioned UNet (time_cond_proj_dim); pass an LCM")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).to(device)
    return tokenizer, text_encoder.eval(), vae.eval(), unet, scheduler


def check_model(args, tokenizer, vae, unet, scheduler, prompts: list[str], is_main: bool) -> tuple:
    """Checks that need the loaded LCM (sizes, step count, prompt lengths); returns the latent shape (C, H, W)."""
    factor = vae_scale(vae) * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise SystemExit(f"error: --resolution must be a multiple of {factor} for this model (got {args.resolution})")
    if args.num_inference_steps > scheduler.config.original_inference_steps:
        raise SystemExit(f"error: --num-inference-steps must be <= {scheduler.config.original_inference_steps}, the "
                         f"steps this LCM was distilled on (got {args.num_inference_steps})")
    unique = list(dict.fromkeys(prompts))  # encode_prompts cuts long prompts silently: say it once
    cut = [p for p, ids in zip(unique, tokenizer(unique, truncation=False, verbose=False).input_ids)
           if len(ids) > tokenizer.model_max_length]
    if cut and is_main:
        print(f"warning: {len(cut)} of {len(unique)} prompts are longer than the text encoder's limit of "
              f"{tokenizer.model_max_length} tokens and are cut to it, e.g. '{cut[0][:50]}...'; shorten them")
    return unet.config.in_channels, args.resolution // vae_scale(vae), args.resolution // vae_scale(vae)


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def add_lora(unet, rank: int, alpha: int) -> list[torch.nn.Parameter]:
    """LoRA on the attention projections (B initialised to zero, so the policy starts at the base)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for param in lora_params:  # trainable weights stay fp32 under autocast
        param.data = param.data.float()
    return lora_params


@torch.no_grad()
def set_lora(unet, lora: dict) -> None:
    """Copy saved LoRA weights (name -> tensor) into the unet."""
    params = dict(unet.named_parameters())
    for name, value in lora.items():
        params[name].copy_(value)


def read_text(path: Path, flag: str, fix: str) -> str:
    """The file's UTF-8 text; an unreadable or binary (undecodable, NUL bytes) file is one line naming flag."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SystemExit(f"error: {flag} '{path}' is not UTF-8 text (byte {error.start} is "
                         f"{error.object[error.start]:#04x}); {fix}")
    except OSError as error:
        raise SystemExit(f"error: {flag} '{path}' cannot be read ({error.strerror}); {fix}")
    if "\0" in text:
        raise SystemExit(f"error: {flag} '{path}' is a binary file (it holds NUL bytes); {fix}")
    return text


PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"  # the default training and evaluation prompts


def read_prompts(path: str | Path, flag: str = "--prompts-file") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: prompts file '{path}' does not exist; pass an existing file, one prompt per line")
    prompts = [line.strip() for line in read_text(path, flag, "pass a text file, one prompt per line").splitlines()]
    if not any(prompts):
        raise SystemExit(f"error: prompts file '{path}' has no prompts; write one prompt per line")
    return [prompt for prompt in prompts if prompt]


def load_reward_spec(spec: str, device: torch.device, dtype: torch.dtype):
    """'name' or 'name=path' -> a frozen reward module (see common.load_reward)."""
    name, _, path = spec.partition("=")
    if name not in REWARDS:
        raise SystemExit(f"error: unknown reward '{name}'; choose one of: {', '.join(REWARDS)}")
    try:
        return load_reward(name, path or None, device=device, dtype=dtype)
    except (FileNotFoundError, ImportError) as error:
        raise SystemExit(f"error: {error}")


def load_eval_rewards(specs, dtype: torch.dtype) -> dict:
    """The evaluation rewards that load (one whose package or weights are missing is skipped with a warning; an
    unknown name stops), kept on the CPU between evaluations so that they cost no GPU memory during training."""
    rewards = {}
    for spec in specs:
        try:
            rewards[spec.partition("=")[0]] = load_reward_spec(spec, torch.device("cpu"), dtype)
        except SystemExit as error:
            if spec.partition("=")[0] not in REWARDS:
                raise
            print(f"warning: skipping evaluation reward: {str(error).removeprefix('error: ')}")
    return rewards


def derived_seed(*keys: int) -> int:
    """A seed from integer keys (seed, step, batch, sample, ...): stateless, so runs resume exactly and ranks differ."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def global_mean(values: torch.Tensor, world_size: int) -> float:
    """Mean over every rank's values (nan where there are none, e.g. every online pair was a tie)."""
    total = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def training_state(step: int, unet, optimizer, grad_scaler, run: dict, **extra) -> dict:
    """A copy of what resuming after `step` needs: LoRA, optimizer, loss scale, run record, the script's extra state."""
    lora = {name: p.detach() for name, p in unet.named_parameters() if p.requires_grad}
    return copy.deepcopy({"step": step, "lora": lora, "optimizer": optimizer.state_dict(),
                          "grad_scaler": grad_scaler.state_dict(), **run, **extra})


def save_lora(unet, directory: Path, training_state: Optional[dict] = None) -> None:
    """The LoRA in diffusers format (LatentConsistencyModelPipeline.load_lora_weights reads it), with the training
    state if given; written to NAME.tmp and renamed, so that an interrupted save never replaces a good directory."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # LatentConsistencyModelPipeline's LoRA saver
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    for leftover in (tmp, old):  # what an interrupted save left; a leftover .old would block the rename below
        shutil.rmtree(leftover, ignore_errors=True)
    # the adapter config (lora_alpha above all) travels in the file's metadata: without it a loader assumes
    # alpha = rank and applies the LoRA at rank / alpha of its trained strength
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        save_directory=tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True)
    if training_state is not None:
        torch.save(training_state, tmp / "training_state.pt")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, unet, state: dict, limit: Optional[int]) -> bool:
    """checkpoints/step_N: LoRA and training state; keeps the newest `limit` (None: all) and drops what interrupted
    saves left. A failed save (disk full) warns and keeps the earlier checkpoints; returns whether it saved."""
    checkpoints = run_dir / "checkpoints"
    try:
        save_lora(unet, checkpoints / f"step_{state['step']:06d}", training_state=state)
    except Exception as error:  # disk full comes as OSError or as the writer's own error type
        print(f"warning: could not save the checkpoint of step {state['step']} in {checkpoints} "
              f"({first_line(error)}); the earlier checkpoints are intact")
        return False
    stale = sorted(checkpoints.glob("step_[0-9]*[0-9]"))[:-limit] if limit else []
    for path in [*stale, *checkpoints.glob("step_*.old"), *checkpoints.glob("step_*.tmp")]:
        shutil.rmtree(path, ignore_errors=True)
    return True


def save_final(unet, run_dir: Path) -> Path:
    """run_dir/final, else (disk full) a new directory in the temp dir, then /dev/shm: the weights outlive the error."""
    failures = []
    for parent in (None, tempfile.gettempdir(), "/dev/shm"):
        try:
            target = (Path(tempfile.mkdtemp(prefix=f"{run_dir.name}_", dir=parent)) if parent else run_dir) / "final"
            save_lora(unet, target)
        except Exception as error:  # disk full comes as OSError or as the writer's own error type
            failures.append(f"{parent or run_dir}: {first_line(error)}")
            continue
        if failures:
            raise SystemExit(f"error: could not save the final LoRA ({failures[0]}); the trained "
                             f"weights are in {target}: move them to {run_dir / 'final'} once there is room")
        return target
    raise SystemExit(f"error: could not save the final LoRA anywhere ({'; '.join(failures)}); the trained weights "
                     "are lost: free disk space and train with --save-every")


def find_checkpoint(path: Path) -> tuple[Path, dict]:
    """A checkpoint directory itself, or the newest readable one inside a run directory; with its training state."""
    states = sorted((path / "checkpoints").glob("step_[0-9]*[0-9]/training_state.pt"), reverse=True)
    candidates = [path] if (path / "training_state.pt").is_file() else [state.parent for state in states]
    if not candidates:
        raise SystemExit(f"error: no checkpoint in '{path}'; pass --resume a run directory saved with --save-every "
                         "or one of its checkpoints/step_N directories")
    for checkpoint in candidates:
        try:
            return checkpoint, torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
        except Exception as error:  # truncated (full disk, partial copy): reader, EOF or unpickling errors
            print(f"warning: skipping the unreadable checkpoint {checkpoint} ({first_line(error)})")
    raise SystemExit(f"error: no readable checkpoint in '{path}'; start a new run or pass --resume another directory")


def prepare_run(args, run: dict, is_main: bool) -> tuple[Optional[dict], object]:
    """Before any model loads: --output-dir must take files; --resume's checkpoint must be readable, by this script,
    with the same RUN_FLAGS, its run directory free. Returns (its state + path + changed flags, its lock) or Nones."""
    if not args.resume:
        check_writable(Path(args.output_dir), "--output-dir")
        return None, None
    checkpoint, state = find_checkpoint(Path(args.resume))
    if state.get("script", run["script"]) != run["script"]:
        raise SystemExit(f"error: '{checkpoint}' was written by {state['script']}; resume it with {state['script']}")
    changed = {flag: [old, run["args"].get(flag)] for flag, old in state.get("args", {}).items()
               if old != run["args"].get(flag) and flag not in ("resume", "output_dir")}  # both unused on resume
    spelled = {"global_batch": "--batch-size x ranks", "world_size": "ranks"}  # the others as flags
    names = {flag: spelled.get(flag, f"--{flag}".replace("_", "-")) for flag in changed}
    for flag in (flag for flag in RUN_FLAGS if flag in changed):
        raise SystemExit(f"error: '{checkpoint}' was trained with {names[flag]} {changed[flag][0]}, this run has "
                         f"{changed[flag][1]}; resume with the same value or start a new run")
    check_writable(checkpoint.parent.parent, "--resume")
    if changed and is_main:
        print("changed on resume: " + ", ".join(f"{names[f]} {old} -> {new}" for f, (old, new) in changed.items()))
    state.update(path=checkpoint, changed=changed)
    return state, lock_run_dir(checkpoint.parent.parent) if is_main else None


def check_writable(path: Path, flag: str) -> None:
    """One line now, not a traceback once the models are loaded, if path (or where it would be made) takes no files."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "is read-only" if existing.is_dir() else "is not a directory"
        raise SystemExit(f"error: {flag} '{path}' cannot take files ('{existing}' {reason}); pass a directory you "
                         "can write to")


def lock_run_dir(run_dir: Path):
    """Lock run_dir/.lock while this process trains there; the OS releases it however the process ends (a killed
    run leaves no stale lock). Returns the open lock file, to be kept referenced."""
    try:
        import fcntl
    except ImportError:  # not on Unix (Windows): train unlocked
        return None
    lock = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise SystemExit(f"error: another process (pid {lock.read().strip() or '?'}) is training in '{run_dir}'; "
                         "wait for it to end or stop it")
    lock.truncate(0)
    print(os.getpid(), file=lock, end="", flush=True)
    return lock


def new_run_dir(args, is_main: bool, world_size: int) -> Path:
    """A new run directory (_2, _3, ... if runs start in the same second), made by rank 0 and broadcast to the rest."""
    names = [None]
    if is_main:
        base = Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
        for n in range(1, 1000):
            names = [str(base.with_name(base.name + (f"_{n}" if n > 1 else "")))]
            with contextlib.suppress(FileExistsError):
                Path(names[0]).mkdir(parents=True)
                break
    if world_size > 1:
        dist.broadcast_object_list(names)
    return Path(names[0])


def first_line(error: BaseException) -> str:
    """An exception's first message line (or its type's name), for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from PIL import Image
    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    pixels = torch.zeros(rows * columns, 3, h, w, dtype=torch.uint8)  # empty cells of the last row stay black
    pixels[:n] = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.reshape(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, 3)
                    .numpy()).save(path)


def write_model_card(directory: Path, args, scores: dict, scored_step: Optional[int]) -> None:
    """README.md (a diffusers-style model card) and args.json beside the saved LoRA."""
    offline = getattr(args, "pairs", "online") == "offline"
    rows = {"base model": args.model, "script": f"{Path(__file__).name}: {__doc__.strip().splitlines()[0]}",
            "reward": f"offline pairs from {args.pairs_file}" if offline else args.reward,
            "beta": getattr(args, "beta", "n/a (PPO's clipped ratio is the only regularizer)"),
            "steps": args.train_steps, "sampling steps": args.num_inference_steps,
            "guidance scale": args.guidance_scale, "LoRA rank / alpha": f"{args.lora_rank} / {args.lora_alpha}",
            "learning rate": args.lr, "seed": args.seed}
    evaluation = [f"Final evaluation (step {scored_step}, mean over the held-out prompts):", "", "| reward | score |",
                  "|---|---|", *[f"| {name.removeprefix('eval/')} | {value:.4f} |" for name, value in scores.items()]]
    lines = ["---", f"base_model: {args.model}", "library_name: diffusers", "tags:", "- lora",
             "- latent-consistency-model", "- text-to-image", f"- {Path(__file__).stem}", "---", "",
             f"# {directory.parent.name}", "",
             f"A LoRA for the LCM `{args.model}`, trained with `{Path(__file__).name}`.", "",
             "| setting | value |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows.items()], "",
             *(evaluation if scores else ["No final evaluation was run."]), "", "Load it with diffusers:", "",
             "```python", "from diffusers import LatentConsistencyModelPipeline", "",
             f'pipe = LatentConsistencyModelPipeline.from_pretrained("{args.model}")',
             f'pipe.load_lora_weights("{directory}")',
             f'image = pipe("a photo of a cat", num_inference_steps={args.num_inference_steps}, '
             f"guidance_scale={args.guidance_scale}).images[0]", "```", "",
             "All arguments of the run are in `args.json`.", ""]
    (directory / "README.md").write_text("\n".join(lines))
    (directory / "args.json").write_text(json.dumps(asdict(args), indent=2))


def validate_shared(args, problems: list = (), **bounds: str) -> None:
    """Reject impossible settings with one line before anything loads: non-finite floats, flags outside their
    bounds (the shared ones, and bounds such as beta=">= 0" or ">= 2; why" that add or override them), the seed's
    range, unknown rewards, missing local directories, then the script's own (failed, message) pairs."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not np.isfinite(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a finite number (got {value})")
    bounds = {"num_inference_steps": ">= 1", "train_steps": ">= 0", "batch_size": ">= 1", "grad_accum": ">= 1",
              "eval_batch_size": ">= 1", "lr": "> 0", "lora_rank": ">= 1", "lora_alpha": "> 0; 0 switches the LoRA off",
              "weight_decay": ">= 0", "log_every": ">= 1", "eval_every": ">= 0", "save_every": ">= 0",
              "max_grad_norm": "> 0; 0 zeroes every update, a negative value reverses it", "resolution": ">= 1",
              "checkpoint_limit": ">= 1", "guidance_scale": ">= 1; the LCM is conditioned on w = guidance_scale - 1",
              **bounds}
    for name, spec in bounds.items():
        bound, _, why = spec.partition("; ")
        value, (relation, limit) = getattr(args, name), bound.split()
        if not (value >= float(limit) if relation == ">=" else value > float(limit)):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be {bound} (got {value}{why and '; ' + why})")
    model_problem = missing_local_directory(args.model)
    failures = [(not 0 <= args.seed < 2**32, f"--seed must be in [0, 2**32) (got {args.seed})"),
                (model_problem, f"could not load the LCM pipeline: --model directory '{args.model}' {model_problem}; "
                                "pass an existing local pipeline directory or a hub id (org/name)")]
    for flag, spec in [("--reward", args.reward), *(("--eval-rewards", spec) for spec in args.eval_rewards)]:
        name, _, path = spec.partition("=")
        problem = missing_local_directory(path) if path and name != "imagereward" else None  # it also takes a file
        failures += [(name not in REWARDS, f"unknown reward '{name}' in {flag}; choose one of: {', '.join(REWARDS)}"),
                     (problem, f"could not load reward '{name}': {flag} directory '{path}' {problem}; pass an "
                               f"existing local directory as {name}=DIR or a hub id")]
    failures += [(args.device.startswith("cuda") and not torch.cuda.is_available(),
                  "CUDA is not available here; pass --device cpu --mixed-precision no (slow)"),
                 (args.resume and not Path(args.resume).is_dir(),
                  f"--resume '{args.resume}' is not a directory; pass a run or checkpoint directory"), *problems]
    for failed, message in failures:
        if failed:
            raise SystemExit(f"error: {message}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
