"""CM-DPO: direct preference optimization of a latent consistency model on its sampling chains.

Seed: "Aligning Consistency Models by Preference Optimization" (no public code; this is the first implementation).
Each LCM step but the last is a Gaussian policy N(a_k f(x_k), s_k^2 I) (f_ref: the UNet with its LoRA off). On a
winner chain w and a loser chain l of one prompt, from OnlinePairs or OfflinePairs (derivation: docs/cm_dpo.md):
    L     = -log sigmoid(beta * sum_k [r_k(w) - r_k(l)]) + con_weight * L_con         dpo_loss, CmDpoObjective
    r_k   = w_k / 2D * (||x_{k-1} - a_k f_ref(x_k)||^2 - ||x_{k-1} - a_k f(x_k)||^2)   step_log_ratio
    w_k   = 1 / max(s_k^2, eps^2), the seed's weighting: the step's precision, floored  step_weight
    L_con = d(f(x_{t_{n+1}}), stopgrad f_target(x_{t_n})) on adjacent grid timesteps    consistency_loss
r_k averages over the D latent dims (one beta at any resolution); the seed's term (--dpo-form seed) pushes WINNERS away.

Run (GPU):  python cm_dpo.py --reward pickscore --train-steps 2000 --track   (or --pairs offline --pairs-file F.jsonl)
Run (CPU, about a minute, on the embedded digits world): README.md, "Each script on the CPU".
"""

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
import tyro
from PIL import Image, ImageOps

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
    """hub id or local directory of an SD1.5 or SDXL pipeline: an LCM, or a base with --unet or --lcm-lora"""
    unet: Optional[str] = None
    """hub id or directory of a UNet-only LCM that replaces the pipeline's (e.g. latent-consistency/lcm-sdxl)"""
    lcm_lora: Optional[str] = None
    """hub id or directory of an LCM-LoRA, fused into the base first (e.g. latent-consistency/lcm-lora-sdv1-5)"""
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
    eval_samples_per_prompt: int = 2
    """samples per held-out prompt, each from its own chain noise; eval/diversity compares them (2 or more)"""
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

def guidance_embedding(guidance_scale: float, dim: int, batch_size: int, device) -> torch.Tensor:
    """Embedding of w = guidance_scale - 1, the LCM's guidance input, as LatentConsistencyModelPipeline computes it.
    A UNet without that input (dim None, e.g. an LCM-LoRA base) gets an empty one: its guidance is classifier-free."""
    if dim is None:
        return torch.zeros(batch_size, 0, device=device)
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


def derived_seed(*keys: int) -> int:
    """A seed from integer keys (seed, step, batch, sample, ...): stateless, so runs resume exactly and ranks differ."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], as the pipeline's postprocessing does; a VAE kept in fp32 (SDXL's under fp16)
    decodes in fp32 under autocast too."""
    with torch.autocast(latents.device.type, enabled=False) if vae.dtype == torch.float32 else contextlib.nullcontext():
        return (vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# ALGORITHM: CM-DPO, the per-step log-ratio, L_DPO and L_con, and the preference pairs (online or from a file)
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


@dataclass
class PairBatch:  # b preference pairs: every tensor of 2b holds the b winners, then the b losers
    embeds: torch.Tensor  # (2b, tokens, dim)
    states: list[torch.Tensor]  # K + 1 tensors (2b, C, H, W): x_K, ..., x_1, x_0
    keep: torch.Tensor  # (b,) float: 1 for pairs that enter L_DPO
    con_t: torch.Tensor  # (2b,) index n into the consistency grid: L_con compares t_{n+1} with t_n
    con_noise: torch.Tensor  # (2b, C, H, W) noise shared by both timesteps
    rewards: Optional[torch.Tensor] = None  # online: (b * samples_per_prompt,) every sample's reward
    gaps: Optional[torch.Tensor] = None  # online: (b,) winner minus loser reward


class CmDpoObjective(torch.nn.Module):
    """A micro-batch's loss in one forward: DDP wraps this (not the UNet) for its one forward per backward."""

    def __init__(self, unet, scheduler, schedule: list[ChainStep], ema: Optional[dict], *, beta: float, eps: float,
                 dpo_form: str, last_step: str, con_weight: float, con_target: str, con_loss: str,
                 gradient_checkpointing: bool):
        super().__init__()
        self.unet, self.scheduler, self.schedule = unet, scheduler, schedule  # the model and its sampling chain
        self.ema = ema  # L_con's EMA target: the running average of the LoRA weights, by parameter name
        self.beta, self.eps, self.dpo_form, self.last_step = beta, eps, dpo_form, last_step  # L_DPO, as the flags
        self.con_weight, self.con_target, self.con_loss = con_weight, con_target, con_loss  # L_con, as the flags
        self.gradient_checkpointing = gradient_checkpointing
        steps = scheduler.config.original_inference_steps  # L_con's grid: the distillation timesteps k-1, ..., T-1
        self.grid = torch.arange(1, steps + 1) * (scheduler.config.num_train_timesteps // steps) - 1

    def policy(self, x, step: ChainStep, embeds, w_embedding):
        return unet_call(consistency_fn, self.gradient_checkpointing, self.unet, x, step, embeds, w_embedding)

    def trajectory_terms(self, batch: PairBatch, w_embedding) -> dict:
        """Per chain (2b,): the summed per-step DPO terms (means over dimensions), the exact KL, the last-step gap."""
        x = batch.states
        total = kl = last_gap = torch.zeros(len(x[0]), device=x[0].device)
        for i, step in enumerate(self.schedule[:-1] if self.last_step == "drop" else self.schedule):
            last = step.alpha_next is None
            f_policy = self.policy(x[i], step, batch.embeds, w_embedding)
            with torch.no_grad():  # the reference is a constant of the loss: no graph, nothing to checkpoint
                f_ref = reference_fn(self.unet, x[i], step, batch.embeds, w_embedding)
            if last and self.last_step == "constrain":
                last_gap = consistency_loss(f_policy, f_ref, "l2")  # mean((f_theta - f_ref)^2)
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
        ema_unet = lambda *inputs, **named: torch.func.functional_call(self.unet, self.ema, inputs, named)
        with torch.no_grad():  # the target: the reference, or the UNet run with the EMA's values as its LoRA weights
            target = (reference_fn(self.unet, x_low, low, embeds, w_embedding) if self.con_target == "reference"
                      else consistency_fn(ema_unet, x_low, low, embeds, w_embedding))
        return consistency_loss(self.policy(x_high, high, embeds, w_embedding), target, self.con_loss)

    def forward(self, batch: PairBatch, w_embedding, multiplier: float):
        """Returns (loss, statistics per pair or chain, detached, named as their train/ metrics; None: not used)."""
        con = None
        clean = batch.states[-1]
        if self.con_weight > 0:  # L_con on the final latents, noised to adjacent grid timesteps t_{n+1} > t_n, same z
            low, high = [chain_step(self.scheduler, self.grid[batch.con_t + j], None, clean.device) for j in (0, 1)]
            x_low, x_high = [step.alpha * clean + step.sigma * batch.con_noise for step in (low, high)]
            con = self.consistency_gap(x_high, high, x_low, low, batch.embeds, w_embedding)
        terms = self.trajectory_terms(batch, w_embedding)
        pair_loss, margin = dpo_loss(*terms["total"].chunk(2), self.beta)
        constrain = self.last_step == "constrain"
        kept = batch.keep.bool()
        # skipped pairs weigh zero but still count in the mean: the step does not grow when few survive
        loss = ((pair_loss * batch.keep).mean() + (0 if con is None else self.con_weight * con.mean())
                + (multiplier * terms["last_gap"].mean() if constrain else 0))
        return loss, {"loss": loss.detach().reshape(1), "loss_dpo": pair_loss.detach()[kept],
                      "implicit_margin": margin.detach()[kept], "loss_con": None if con is None else con.detach(),
                      "kl": terms["kl"].detach(), "last_step_gap": terms["last_gap"].detach() if constrain else None}


@torch.no_grad()
def sample_trajectory(unet, latents, noises, schedule: list[ChainStep], embeds, w_embedding) -> list[torch.Tensor]:
    """The K-step chain as LatentConsistencyModelPipeline runs it; states [x_K, ..., x_0], schedule[i]: i -> i + 1."""
    states = [latents]
    for k, step in enumerate(schedule):
        denoised = consistency_fn(unet, states[-1], step, embeds, w_embedding)
        states.append(denoised if step.alpha_next is None else step.alpha_next * denoised + step.sigma_next * noises[k])
    return states


@dataclass
class PairSetup:
    """A pair's draws are seeded by (seed, step, micro-batch, its global index): N ranks x b pairs = 1 x N*b pairs."""
    models: tuple  # encode, vae, unet
    schedule: list[ChainStep]
    latent_shape: tuple  # (C, H, W)
    w_row: torch.Tensor  # (1, dim): the guidance embedding of one sample
    grid_size: int  # timesteps in L_con's grid
    seed: int
    batch_size: int  # pairs per micro-batch on each rank
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()

    def indices(self, num_items: int, step: int, micro: int) -> list[tuple[int, int]]:
        draw = random.Random(derived_seed(self.seed, step, micro))
        chosen = draw.choices(range(num_items), k=self.batch_size * self.world_size)
        return list(enumerate(chosen))[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def generator(self, step: int, micro: int, index: int, use: int):  # use 0: chain noise; 1: L_con timesteps, noise
        return torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, step, micro, index, use))

    def consistency_draws(self, step: int, micro: int, items: list[tuple[int, int]]) -> dict:
        generators = [self.generator(step, micro, i, 1) for i, _ in items]
        t = [torch.randint(0, self.grid_size - 1, (2,), generator=g, device=g.device).cpu() for g in generators]
        noise = [torch.randn((2, *self.latent_shape), generator=g, device=g.device) for g in generators]
        return {"con_t": torch.stack(t, 1).flatten(), "con_noise": torch.stack(noise, 1).flatten(0, 1).to(self.device)}


@dataclass
class OnlinePairs:
    """Pairs from the current policy: of samples_per_prompt samples of a prompt, the best and worst by reward_fn."""
    prompts: list[str]
    reward_fn: Callable  # (images in [0, 1], prompts) -> rewards
    samples_per_prompt: int
    reward_margin: float

    @torch.no_grad()
    def batch(self, setup: PairSetup, step: int, micro: int) -> PairBatch:
        encode, vae, unet = setup.models
        n = self.samples_per_prompt
        items = setup.indices(len(self.prompts), step, micro)
        chosen = [self.prompts[j] for _, j in items]
        draws = [draw_chain_noise((n, *setup.latent_shape), len(setup.schedule), setup.generator(step, micro, i, 0),
                                  setup.device) for i, _ in items]
        latents = torch.cat([latent for latent, _ in draws])  # pair-major: pair 0's n samples, pair 1's, ...
        noises = [torch.cat(per_step) for per_step in zip(*[noise for _, noise in draws])]
        with setup.autocast:
            embeds = encode(chosen)
            states = sample_trajectory(unet, latents, noises, setup.schedule, embeds.repeat_interleave(n, 0),
                                       setup.w_row.expand(len(latents), -1))
            rewards = self.reward_fn(decode(vae, states[-1]), [prompt for prompt in chosen for _ in range(n)]).float()
        grouped = rewards.view(len(chosen), n)
        gaps = grouped.amax(1) - grouped.amin(1)
        rows = torch.arange(len(chosen), device=rewards.device) * n
        order = torch.cat([rows + grouped.argmax(1), rows + grouped.argmin(1)]).to(setup.device)  # winners, then losers
        keep = ((gaps > 0) & (gaps >= self.reward_margin)).float().to(setup.device)
        return PairBatch(embeds=torch.cat([embeds, embeds]), states=[s[order] for s in states], keep=keep,
                         rewards=rewards, gaps=gaps, **setup.consistency_draws(step, micro, items))


@dataclass
class OfflinePairs:
    """Pairs from a file (read_pairs), each image VAE-encoded once. Chains through them are approximate (offline_chain):
    "forward" noises the clean latent again at every step, "renoise" takes the reference's step from the last state."""
    records: list[dict]
    resolution: int
    offline_chain: str
    latents: dict = field(default_factory=dict)  # image path -> latent

    @torch.no_grad()
    def batch(self, setup: PairSetup, step: int, micro: int) -> PairBatch:
        encode, vae, unet = setup.models
        items = setup.indices(len(self.records), step, micro)
        records = [self.records[j] for _, j in items]
        paths = [r[key] for key in ("winner", "loser") for r in records]
        for path in sorted(set(paths) - self.latents.keys()):  # encoded once, as the posterior mean (not a sample)
            image = ImageOps.fit(Image.open(path).convert("RGB"), (self.resolution,) * 2, Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 127.5 - 1
            latent = vae.encode(pixels.permute(2, 0, 1)[None].to(vae.device, vae.dtype)).latent_dist.mean
            self.latents[path] = (latent * vae.config.scaling_factor)[0].float().cpu()
        clean = torch.stack([self.latents[path] for path in paths]).to(setup.device)
        noise = [torch.randn((len(setup.schedule), *setup.latent_shape), device=setup.device,
                             generator=setup.generator(step, micro, i, 0)) for i, _ in items]
        noise = torch.stack(noise + noise, dim=1)  # (K, 2b, ...): the winner and loser of a pair share it
        with setup.autocast:
            embeds = torch.cat(2 * [encode([r["prompt"] for r in records])])
            w = setup.w_row.expand(len(embeds), -1)
            states = [setup.schedule[0].alpha * clean + setup.schedule[0].sigma * noise[0]]  # x_K: clean, noised
            for i, previous in enumerate(setup.schedule[:-1], start=1):
                mean = clean if self.offline_chain == "forward" else reference_fn(unet, states[-1], previous, embeds, w)
                states.append(previous.alpha_next * mean.float() + previous.sigma_next * noise[i])
        return PairBatch(embeds=embeds, states=[*states, clean], keep=torch.ones(len(records), device=setup.device),
                         **setup.consistency_draws(step, micro, items))


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    validate(args)
    online = args.pairs == "online"
    if online:
        train_prompts = read_prompts(args.prompts_file or PROMPTS_DIR / "train.txt")
    else:  # every line and image is checked before any model loads
        pairs = OfflinePairs(read_pairs(args.pairs_file), args.resolution, args.offline_chain)
    eval_prompts = read_prompts(args.eval_prompts_file or PROMPTS_DIR / "eval.txt", "--eval-prompts-file")
    run = Run(args)  # rank and device; a --resume checkpoint is checked before models load
    # ---- models: the LCM with a LoRA (the policy; the reference is the same UNet with the LoRA off), the rewards
    encode, vae, unet, scheduler, latent_shape = load_lcm(args, run.device, run.dtype)
    if online:  # the reward ranks the policy's samples
        reward_fn = load_reward_spec(args.reward, run.device, run.dtype)
        pairs = OnlinePairs(train_prompts, reward_fn, args.samples_per_prompt, args.reward_margin)
    eval_rewards = load_eval_rewards(args.eval_rewards, run.dtype) if run.is_main else {}
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    ema = None  # L_con's EMA target (--con-target ema): the running average of the LoRA weights, by name
    if args.con_target == "ema":  # it starts at the LoRA weights, or continues a resumed run's average
        start = run.resumed["ema"] if run.resumed else {n: p for n, p in unet.named_parameters() if p.requires_grad}
        ema = {name: value.detach().clone().to(run.device) for name, value in start.items()}
    optimizer = torch.optim.AdamW(lora_params, args.lr, weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, run.device)
    objective = CmDpoObjective(unet, scheduler, schedule, ema, beta=args.beta, eps=args.eps, dpo_form=args.dpo_form,
                               last_step=args.last_step, con_weight=args.con_weight, con_target=args.con_target,
                               con_loss=args.con_loss, gradient_checkpointing=args.gradient_checkpointing)
    w_row = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, 1, run.device)
    setup = PairSetup(models=(encode, vae, unet), schedule=schedule, latent_shape=latent_shape,
                      w_row=w_row, grid_size=len(objective.grid), seed=args.seed, batch_size=args.batch_size,
                      rank=run.rank, world_size=run.world_size, device=run.device, autocast=run.autocast)
    pairs_per_step = args.batch_size * args.grad_accum * run.world_size
    images_per_step = pairs_per_step * (args.samples_per_prompt if online else 2)  # offline: 2 read, none scored
    source = (f"online, best and worst of {args.samples_per_prompt} samples per prompt" if online
              else f"offline, {len(pairs.records)} pairs in {args.pairs_file}")
    start_step, objective = run.begin(unet, optimizer, objective, f"{args.batch_size} x {args.grad_accum} accumulation "
                                      f"x {run.world_size} ranks = {pairs_per_step} pairs ({source})")
    multiplier = run.resumed["multiplier"] if run.resumed else args.last_step_multiplier  # resumed: cm_dpo's own state

    def evaluate_now(step: int) -> None:  # the policy's samples (its chain, no gradients) on the held-out prompts
        run.evaluate(step, lambda x, noises, embeds, w: sample_trajectory(unet, x, noises, schedule, embeds, w)[-1],
                     setup.models, eval_prompts, eval_rewards, latent_shape, len(schedule))

    def gathered(name: str) -> float:  # this step's mean of a statistic over every rank's micro-batches
        return global_mean(torch.cat([s[name] for s in stats]), run.world_size)

    if start_step == 0:
        evaluate_now(0)
    for step in range(start_step + 1, args.train_steps + 1):
        unet.train()
        started = time.perf_counter()
        stats = []
        for micro in range(args.grad_accum):
            # ---- sample and loss, both inside backward_pass so that running out of memory in either is one line
            with run.backward_pass(objective, step, last=micro == args.grad_accum - 1):
                batch = pairs.batch(setup, step, micro)
                with run.autocast:
                    loss, micro_stats = objective(batch, w_row.expand(len(batch.embeds), -1), multiplier)
                run.grad_scaler.scale(loss / args.grad_accum).backward()
            stats.append({**micro_stats, "implicit_accuracy": (micro_stats["implicit_margin"] > 0).float(),
                          "kept_pairs": batch.keep, "reward": batch.rewards, "reward_gap": batch.gaps})
        # ---- update: skipped on every rank together when a loss or a gradient is not finite; then EMA, dual ascent
        finite = torch.isfinite(torch.cat([s["loss"] for s in stats])).all().item()
        grad_norm = run.update(step, finite, lora_params, args.max_grad_norm)
        if grad_norm is not None and ema is not None:
            for average, param in zip(ema.values(), lora_params):  # both in the UNet's parameter order
                average.lerp_(param.detach(), 1 - args.ema_decay)
        if grad_norm is not None and args.last_step == "constrain" and args.dual_lr > 0:
            # every rank sees the same global gap, so the multiplier stays identical across ranks
            multiplier = max(0.0, multiplier + args.dual_lr * (gathered("last_step_gap") - args.last_step_budget))
        step_time = time.perf_counter() - started
        if grad_norm is not None and step % args.log_every == 0:
            means = {name: gathered(name) for name, value in stats[0].items() if value is not None}
            means.update(divergence=means["kl"], grad_norm=grad_norm)
            if args.last_step == "constrain":
                means["multiplier"] = multiplier
            text = (("reward {reward:.4f} " if online else "") + "loss_dpo {loss_dpo:.4f} margin {implicit_margin:.4f} "
                    "accuracy {implicit_accuracy:.2f} kl {kl:.4f} loss {loss:.4f}").format_map(means)
            run.log_step(step, {f"train/{name}": value for name, value in means.items()},
                         f"{text} | {pairs_per_step / step_time:.2f} pairs/s", step_time, images_per_step,
                         images_per_step if online else 0)
        run.save(step, multiplier=multiplier, ema=ema)
        if args.eval_every and step % args.eval_every == 0 and step != args.train_steps:
            evaluate_now(step)
    run.finish(lora_params, lambda: evaluate_now(args.train_steps))


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE (cm_dpo only): the flags that define a run, the checks of the flags, offline pair files
# --------------------------------------------------------------------------------------------

RUN_FLAGS = ("model", "unet", "lcm_lora", "reward", "resolution", "num_inference_steps", "guidance_scale",
             "lora_rank", "lora_alpha", "seed", "global_batch", "grad_accum", "pairs", "pairs_file", "offline_chain",
             "samples_per_prompt", "dpo_form", "last_step", "con_target")  # --resume refuses their changes
OOM_FIX = "lower --batch-size (raise --grad-accum to keep the batch), --samples-per-prompt or --resolution"


def validate(args: Args) -> None:
    validate_shared(args, [
        (args.grad_accum < 1, f"--grad-accum must be >= 1 (got {args.grad_accum})"),
        *((getattr(args, name) <= 0, f"--{name} must be > 0 (got {getattr(args, name)})") for name in ("beta", "eps")),
        (args.samples_per_prompt < 2, f"--samples-per-prompt must be >= 2 (got {args.samples_per_prompt})"),
        *((getattr(args, name) < 0, f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
          for name in ("reward_margin", "con_weight", "last_step_multiplier", "dual_lr", "last_step_budget")),
        (not 0 <= args.ema_decay < 1, f"--ema-decay must be in [0, 1) (got {args.ema_decay})"),
        (args.num_inference_steps == 1 and args.last_step != "smooth",
         f"--last-step {args.last_step} leaves no step to compare at --num-inference-steps 1; use --last-step smooth"),
        (args.pairs == "offline" and args.pairs_file is None, "--pairs offline needs --pairs-file (JSONL of pairs)"),
        (args.pairs == "online" and args.pairs_file is not None, "--pairs-file is read with --pairs offline; add it"),
    ])


def read_pairs(path: str) -> list[dict]:
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
    if not lines:
        raise SystemExit(f"error: --pairs-file '{path}' is missing or empty; pass a JSONL file of prompt/winner/loser")
    records = []
    for number, line in enumerate(lines, start=1):
        where = f"--pairs-file '{path}' line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: {where} is not valid JSON ({error.msg}); write one JSON object per line")
        if not isinstance(record, dict) or not all(type(record.get(k)) is str for k in ("prompt", "winner", "loser")):
            raise SystemExit(f"error: {where} needs string fields prompt, winner and loser")
        for key in ("winner", "loser"):
            record[key] = str(Path(path).parent / record[key])
            try:
                Image.open(record[key]).convert("RGB")  # decoded in full: a truncated file fails here, not in training
            except Exception as error:  # missing, or no image PIL can decode (it raises several types)
                raise SystemExit(f"error: {where}: {key} image '{record[key]}' cannot be read ({error})")
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE: loading, runs and checkpoints, ranks, evaluation and logging (identical in all four scripts)
# --------------------------------------------------------------------------------------------

class Run:
    """A process's share of a run, made before any model loads (so that flag and resume errors come first)."""

    def __init__(self, args, unit: str = "step"):
        self.args = args
        self.unit = unit
        self.rank = 0
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device(args.device)
        if self.world_size > 1:  # started by torchrun
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
        self.autocast = torch.autocast(self.device.type, self.dtype, enabled=args.mixed_precision != "no")
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=args.mixed_precision == "fp16")
        self.nonfinite_fix = "lower --lr or use --mixed-precision bf16/no"
        self.in_a_row = 0
        self.skipped = 0
        self.started = time.time()
        self.record = {**asdict(args), "world_size": self.world_size, "global_batch": args.batch_size * self.world_size}
        self.resumed = resume_state(args, self.record) if args.resume else None
        self.in_place = self.resumed["in_place"] if self.resumed else False
        names = [Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(self.started)}"]
        while names[0].exists():  # another run started in the same second
            names[0] = names[0].with_name(names[0].name + "_")
        if self.world_size > 1:  # rank 0's name: the ranks may start in different seconds
            dist.broadcast_object_list(names)
        self.run_dir = self.resumed["path"].parent.parent if self.in_place else names[0]
        self.wandb = start_wandb(args, self.run_dir) if args.track and self.is_main else None
        if self.is_main and not self.in_place:
            self.run_dir.mkdir(parents=True)
            resumed_from = str(self.resumed["path"]) if self.resumed else None
            (self.run_dir / "args.json").write_text(json.dumps({**asdict(args), "resumed_from": resumed_from}))
        signal.signal(signal.SIGINT, self.interrupted)
        torch.manual_seed(args.seed)

    def begin(self, unet, optimizer, objective, batch_text: str):
        """Restore a resumed run, wrap the objective for DDP; returns (the step it starts after, objective)."""
        self.unet = unet
        self.optimizer = optimizer
        self.start_step = 0
        if self.resumed:
            self.start_step = self.resumed["step"]
            self.started -= self.resumed["elapsed_s"]
            unet.load_state_dict(self.resumed["lora"], strict=False)
            optimizer.load_state_dict(self.resumed["optimizer"])
            for group in optimizer.param_groups:  # the saved groups hold the checkpoint's values
                group.update(lr=self.args.lr, weight_decay=self.args.weight_decay)
            if self.resumed["grad_scaler"]:  # a loss scale exists only under fp16
                self.grad_scaler.load_state_dict(self.resumed["grad_scaler"])
        if self.is_main and self.in_place:  # the steps after the checkpoint run again: their lines go
            metrics = self.run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines(keepends=True)
            metrics.write_text("".join(line for line in lines if json.loads(line)["step"] <= self.start_step))
        if self.world_size > 1:  # all-reduces the gradients of the LoRA, the only trainable weights
            objective = torch.nn.parallel.DistributedDataParallel(objective, broadcast_buffers=False)
        if self.is_main:
            resumed_at = f" (resumed at {self.unit} {self.start_step})" if self.resumed else ""
            print(f"run directory: {self.run_dir}{resumed_at}\neffective batch: {batch_text} per {self.unit}")
            if self.wandb:
                (self.run_dir / "wandb_run_id.txt").write_text(self.wandb.run.id)
        self.loop_started = time.perf_counter()
        return self.start_step, objective

    def interrupted(self, *_) -> None:
        """Ctrl-C: one line naming where to continue from, not a traceback."""
        saved = sorted((self.run_dir / "checkpoints").glob("step_*[0-9]"))
        how = "no checkpoint was saved (--save-every N saves them)"
        if saved:
            how = (f"the newest checkpoint is {saved[-1]}; continue with: "
                   f"python {Path(__file__).name} --resume {self.run_dir}")
        raise SystemExit(f"interrupted; {how}" if self.is_main else 1)

    @contextlib.contextmanager
    def backward_pass(self, objective, step: int, last: bool = True):
        """A micro-batch's forward and backward: DDP all-reduces only in the last; out of memory is one line."""
        try:
            with contextlib.nullcontext() if last or self.world_size == 1 else objective.no_sync():
                yield
        except torch.OutOfMemoryError:
            raise SystemExit(f"error: out of memory at {self.unit} {step}; {OOM_FIX}")

    def update(self, step: int, finite: bool, params, max_grad_norm: float) -> Optional[float]:
        """Clip and step, or skip on every rank if any rank's loss or gradient was not finite (its backward still
        ran, so the all-reduces stay aligned). Returns the gradient norm, None if skipped."""
        self.grad_scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        ok = torch.tensor(float(finite and grad_norm.isfinite()), device=self.device)
        all_ok = global_mean(ok, self.world_size) == 1
        if all_ok:
            self.grad_scaler.step(self.optimizer)
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.skipped += 1
            if self.is_main:
                print(f"warning: {self.unit} {step}: non-finite loss or gradient, update skipped")
        self.grad_scaler.update()  # after a skip under fp16 this lowers the loss scale
        self.optimizer.zero_grad(set_to_none=True)
        if self.in_a_row >= self.args.max_nonfinite_steps:
            self.stop(f"{self.in_a_row} non-finite {self.unit}s in a row")
        return grad_norm.item() if all_ok else None

    def stop(self, what: str) -> None:
        """Exit with one line naming the newest checkpoint whose weights are finite."""
        where = "no checkpoint has finite weights"
        for checkpoint in sorted((self.run_dir / "checkpoints").glob("step_*[0-9]"), reverse=True):
            lora = torch.load(checkpoint / "training_state.pt", weights_only=True)["lora"]
            if all(value.isfinite().all() for value in lora.values()):
                where = f"then --resume {checkpoint}"
                break
        raise SystemExit(f"error: {what}; {self.nonfinite_fix}, {where}" if self.is_main else 1)

    def log(self, metrics: dict, step: int, media: Optional[dict] = None) -> None:
        """Scalars to metrics.jsonl (NaN as null: JSON has none) and wandb; media to wandb only."""
        finite = {name: value if math.isfinite(value) else None for name, value in metrics.items()}
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **finite}) + "\n")
        if self.wandb:
            self.wandb.log({**metrics, **(media or {})}, step=step)

    def log_step(self, step: int, metrics: dict, text: str, step_time: float, images: int, queries: int) -> None:
        """Print a step's line with its ETA; log it with the run's cost so far (the x axes of cost curves)."""
        if not self.is_main:
            return
        elapsed = time.time() - self.started
        eta = (time.perf_counter() - self.loop_started) / (step - self.start_step) * (self.args.train_steps - step)
        print(f"{self.unit} {step}/{self.args.train_steps} {text} | {images / step_time:.2f} samples/s | "
              f"elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min")
        metrics.update({"perf/step_time_s": step_time, "perf/samples_per_s": images / step_time,
                        "perf/train_images": step * images, "perf/reward_queries": step * queries,
                        "perf/elapsed_s": elapsed, "train/skipped_steps": self.skipped})
        if self.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log(metrics, step)

    @torch.no_grad()
    def evaluate(self, step: int, sample, models, prompts: list[str], rewards: dict, latent_shape: tuple,
                 num_steps: int) -> None:
        """Sample each held-out prompt --eval-samples-per-prompt times with fixed noise (sample: the script's chain to
        the final latents), score them with every evaluation reward, log the means and the diversity, save the grid."""
        if self.is_main:
            encode, vae, unet = models
            unet.eval()
            generator = torch.Generator(self.device).manual_seed(self.args.seed + 1_000_003)
            images = []
            scores = {f"eval/{name}": [] for name in rewards}
            clip = next((reward for reward in rewards.values() if hasattr(reward, "image_embeds")), None)
            clip_embeds = []
            samples = self.args.eval_samples_per_prompt
            prompts = [prompt for prompt in prompts for _ in range(samples)]  # side by side, each its own chain noise
            for reward in rewards.values():  # kept on the CPU between evaluations
                reward.to(self.device)
            for start in range(0, len(prompts), self.args.eval_batch_size):
                batch = prompts[start:start + self.args.eval_batch_size]
                latents, noises = draw_chain_noise((len(batch), *latent_shape), num_steps, generator, self.device)
                w = guidance_embedding(self.args.guidance_scale, unet.config.time_cond_proj_dim, len(batch),
                                       self.device)
                with self.autocast:
                    embeds = encode(batch)
                    batch_images = decode(vae, sample(latents, noises, embeds, w))
                    for name, reward in rewards.items():
                        scores[f"eval/{name}"].append(reward(batch_images, batch).float().cpu())
                    if clip is not None:
                        clip_embeds.append(clip.image_embeds(batch_images).cpu())
                images.append(batch_images.cpu())
            for reward in rewards.values():
                reward.to("cpu")
            self.scores = {name: torch.cat(values).mean().item() for name, values in scores.items()}
            if clip is not None and samples > 1:  # reward hacking collapses a prompt's samples towards one image
                self.scores["eval/diversity"] = clip.diversity(torch.cat(clip_embeds), samples)
            elif step == 0:  # said once, at the base's evaluation
                print("eval/diversity skipped: it needs a CLIP-based evaluation reward and 2+ samples per prompt")
            self.example_prompt = prompts[0]
            print(f"eval {self.unit} {step}: " + " ".join(f"{k}={v:.4f}" for k, v in self.scores.items()))
            grid = self.run_dir / "samples" / f"step_{step:06d}.png"
            save_image_grid(torch.cat(images), grid)
            self.log(self.scores, step, {"eval/samples": self.wandb.Image(str(grid))} if self.wandb else None)
        if self.world_size > 1:
            dist.barrier()

    def save(self, step: int, **extra) -> None:
        """checkpoints/step_N when one is due (extra: the script's own state), never after a non-finite loss."""
        if self.args.save_every and step % self.args.save_every == 0 and not self.in_a_row and self.is_main:
            lora = {name: p for name, p in self.unet.named_parameters() if p.requires_grad}
            state = dict(step=step, lora=lora, optimizer=self.optimizer.state_dict(), script=Path(__file__).name,
                         grad_scaler=self.grad_scaler.state_dict(), args=self.record,
                         elapsed_s=time.time() - self.started, **extra)
            target = self.run_dir / "checkpoints" / f"step_{step:06d}"
            save_lora(self.unet, target, self.args, state)
            for old in sorted(target.parent.glob("step_*[0-9]"))[:-self.args.checkpoint_limit]:  # the newest stay
                shutil.rmtree(old)
        if self.world_size > 1:
            dist.barrier()

    def finish(self, params, final_evaluation) -> None:
        """The final LoRA if its weights are finite, then its evaluation and card (whose failures only warn)."""
        final = self.run_dir / "final"
        if self.is_main:
            if not all(p.isfinite().all() for p in params):
                self.stop("the LoRA weights are not finite, so final/ is not written")
            save_lora(self.unet, final, self.args)
        final_evaluation()
        if self.is_main:
            if not all(math.isfinite(value) for value in self.scores.values()):
                shutil.rmtree(final)
                self.stop("the LoRA gives non-finite evaluation scores, so final/ is removed")
            write_model_card(final, self.args, self.scores, self.example_prompt)
            print(f"saved {final}; evaluate it: python benchmarks/evaluate.py --lora {final}")
            if self.wandb:
                self.wandb.finish()
        if self.world_size > 1:
            dist.destroy_process_group()


def cli(args_class):
    """The flags; with --resume, the checkpoint's own flags are the defaults, so only a change needs typing."""
    argv = sys.argv[1:]
    resume = [value for flag, value in zip(argv, argv[1:]) if flag == "--resume"]
    resume += [flag.removeprefix("--resume=") for flag in argv if flag.startswith("--resume=")]
    default = None
    for path in resume[-1:]:
        saved = [Path(path, "args.json"), *sorted(Path(path).glob("checkpoints/step_*[0-9]/args.json"))]
        if saved[-1].is_file():
            flags = json.loads(saved[-1].read_text())
            known = {field.name for field in fields(args_class)}  # another script's flags: resume_state refuses it
            default = args_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in flags.items() if k in known})
    return tyro.cli(args_class, default=default, description=__doc__.split("\n\n")[0])


def resume_state(args, record: dict) -> dict:
    """--resume's checkpoint (or a run directory's newest), checked: this script's, same RUN_FLAGS, steps left."""
    path = Path(args.resume)
    found = [path] if (path / "training_state.pt").is_file() else sorted(path.glob("checkpoints/step_*[0-9]"))
    if not found:
        raise SystemExit(f"error: no checkpoint in '{path}'; pass a run directory saved with --save-every")
    checkpoint = found[-1]
    state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
    if state["script"] != Path(__file__).name:
        raise SystemExit(f"error: '{checkpoint}' was written by {state['script']}; resume it with {state['script']}")
    for flag in [flag for flag in RUN_FLAGS if state["args"].get(flag) != record[flag]][:1]:
        name = {"global_batch": "--batch-size x ranks", "world_size": "ranks"}.get(flag, "--" + flag.replace("_", "-"))
        raise SystemExit(f"error: '{checkpoint}' was trained with {name} {state['args'][flag]}, this run has "
                         f"{record[flag]}; resume with the same value or start a new run")
    if args.train_steps <= state["step"]:
        raise SystemExit(f"error: '{checkpoint}' is at {state['step']}; pass a --train-steps above it")
    newest = sorted(checkpoint.parent.glob("step_*[0-9]"))[-1]
    # a run's newest checkpoint continues in its run directory; any other starts a new one
    state["in_place"] = checkpoint.parent.name == "checkpoints" and checkpoint == newest
    state["path"] = checkpoint
    return state


def start_wandb(args, run_dir: Path):
    """wandb, continuing the run directory's own wandb run on resume; one line if it cannot start."""
    import wandb
    id_file = run_dir / "wandb_run_id.txt"
    run_id = id_file.read_text() if id_file.exists() else None
    try:
        wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=asdict(args), name=run_dir.name,
                   id=run_id, resume="allow")
    except Exception as error:  # no API key, no network: many types
        raise SystemExit(f"error: --track could not start wandb ({first_line(error)}); run `wandb login` once, "
                         "or set WANDB_MODE=offline")
    return wandb


def save_lora(unet, directory: Path, args, training_state: Optional[dict] = None) -> None:
    """The LoRA in diffusers format, args.json, the training state if given: in NAME.tmp, then renamed NAME."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # LatentConsistencyModelPipeline's saver
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    tmp = directory.with_name(directory.name + ".tmp")
    try:  # the adapter's config travels in the file: without lora_alpha a loader assumes alpha = rank
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True)
        (tmp / "args.json").write_text(json.dumps(asdict(args), indent=2))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
    except BaseException:  # a half-written save (disk full, Ctrl-C) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)  # only final/ is written twice (a finished run, resumed)
    tmp.rename(directory)


def write_model_card(directory: Path, args, scores: dict, prompt: str) -> None:
    table = "".join(f"| {name} | {value:.4f} |\n" for name, value in scores.items())
    unet = f"unet = UNet2DConditionModel.from_pretrained({json.dumps(args.unet)})\n" if args.unet else ""
    lcm_lora = (f"pipe.load_lora_weights({json.dumps(args.lcm_lora)}, adapter_name='lcm')\npipe.fuse_lora()\n"
                "pipe.unload_lora_weights()  # the LCM-LoRA stays fused in\n") if args.lcm_lora else ""
    (directory / "README.md").write_text(
        f"---\nbase_model: {args.model}\nlibrary_name: diffusers\ntags: [lora, latent-consistency-model]\n---\n\n"
        f"# {directory.parent.name}\n\nA LoRA for `{args.model}`, trained by `{Path(__file__).name}` "
        f"({__doc__.splitlines()[0]}); every flag is in `args.json`.\n\n"
        f"| held-out metric | mean |\n|---|---|\n{table}\n```python\n"
        f"from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel\n\n{unet}"
        f"pipe = DiffusionPipeline.from_pretrained({json.dumps(args.model)}{', unet=unet' if unet else ''})\n"
        f"pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n{lcm_lora}"
        f"pipe.load_lora_weights({json.dumps(str(directory))})\n"
        f"image = pipe({json.dumps(prompt)}, num_inference_steps={args.num_inference_steps}, guidance_scale="
        f"{args.guidance_scale}, height={args.resolution}, width={args.resolution}).images[0]\n```\n")


def load_lcm(args, device: torch.device, weight_dtype: torch.dtype):
    """encode(prompts), VAE, UNet, LCMScheduler and latent shape (C, H, W) of an SD1.5 or SDXL pipeline (read from its
    files), frozen, in weight_dtype; --unet replaces its UNet, --lcm-lora is fused into it as its model card does."""
    from diffusers import AutoencoderKL, DiffusionPipeline, LCMScheduler, UNet2DConditionModel, loaders
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    try:
        layout = DiffusionPipeline.load_config(args.model)  # model_index.json
        sdxl = "text_encoder_2" in layout
        names = ["", "_2"] if sdxl else [""]
        tokenizers = [CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer" + n) for n in names]
        text_encoders = [model.from_pretrained(args.model, subfolder="text_encoder" + n, torch_dtype=weight_dtype)
                         for model, n in zip([CLIPTextModel, CLIPTextModelWithProjection], names)]
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=weight_dtype)
        if sdxl and vae.config.force_upcast and weight_dtype == torch.float16:  # as SDXL's pipeline upcasts it
            vae.float()
        unet_path, unet_folder = (args.unet, None) if args.unet else (args.model, "unet")
        unet = UNet2DConditionModel.from_pretrained(unet_path, subfolder=unet_folder, torch_dtype=weight_dtype)
        scheduler = LCMScheduler.from_pretrained(args.model, subfolder="scheduler")  # any base's, as LCMScheduler
        if args.lcm_lora:
            loader = loaders.StableDiffusionXLLoraLoaderMixin if sdxl else loaders.StableDiffusionLoraLoaderMixin
            state, alphas, metadata = loader.lora_state_dict(args.lcm_lora, return_lora_metadata=True)
            loader.load_lora_into_unet(state, alphas, unet, adapter_name="lcm", metadata=metadata)
            unet.fuse_lora()
            unet.unload_lora()  # its weights stay fused; the policy's LoRA is then the only adapter
    except Exception as error:  # hub and file errors come in many types; all mean the same here
        given = {"--model": args.model, "--unet": args.unet, "--lcm-lora": args.lcm_lora}
        names = ", ".join(f"{flag} '{value}'" for flag, value in given.items() if value)
        raise SystemExit(f"error: could not load {names} ({first_line(error)}); pass local directories or cached "
                         "hub ids (offline: set HF_HUB_OFFLINE=1)")
    for module in (*text_encoders, vae, unet):
        module.requires_grad_(False).to(device).eval()
    w_conditioned = unet.config.time_cond_proj_dim is not None
    if not (w_conditioned or args.lcm_lora) and os.environ.get("RANK", "0") == "0":  # once, not once per rank
        print("warning: this UNet takes no guidance input, so it may not be a consistency model; pass an LCM with "
              "--model or --unet, or fuse one in with --lcm-lora")

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        """The pipeline's prompt embeddings; SDXL's: both encoders' penultimate states, then the pooled embedding
        as one more token, so that the algorithms' batch operations carry it too (unet_inputs takes it out)."""
        outputs = []
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids  # to 77
            outputs.append(text_encoder(ids.to(device), output_hidden_states=sdxl))
        if not sdxl:
            return outputs[0][0]
        states = torch.cat([output.hidden_states[-2] for output in outputs], -1)
        pooled = outputs[1].text_embeds
        pooled = torch.nn.functional.pad(pooled, (0, states.shape[-1] - pooled.shape[-1]))
        return torch.cat([states, pooled[:, None].to(states.dtype)], 1)

    negative = None
    if not w_conditioned and args.guidance_scale > 1:  # classifier-free guidance, the pipelines' rule
        negative = encode([""])  # the unconditional input: the empty prompt, or zeros where SDXL's config says so
        if sdxl and layout.get("force_zeros_for_empty_prompt", True):
            negative = torch.zeros_like(negative)

    def unet_inputs(unet, inputs: tuple, kwargs: dict):
        """The SDXL and classifier-free pipelines' additions to a UNet call (the unconditional half first)."""
        x, t = inputs
        embeds = kwargs["encoder_hidden_states"]
        if negative is not None:
            x = torch.cat([x, x])
            t = torch.cat([t, t]) if t.ndim else t
            embeds = torch.cat([negative.to(embeds.dtype).expand_as(embeds), embeds])
        if sdxl:  # size ids: original size, crop corner, target size
            sizes = torch.tensor([args.resolution] * 2 + [0, 0] + [args.resolution] * 2, dtype=embeds.dtype)
            pooled = embeds[:, -1, :text_encoders[1].config.projection_dim]
            kwargs["added_cond_kwargs"] = dict(text_embeds=pooled, time_ids=sizes.to(x.device).expand(len(x), 6))
            embeds = embeds[:, :-1]
        timestep_cond = kwargs["timestep_cond"] if w_conditioned else None  # w-less: guidance_embedding is empty
        return (x, t), {**kwargs, "encoder_hidden_states": embeds, "timestep_cond": timestep_cond}

    def guide(unet, inputs: tuple, output) -> None:
        """Classifier-free guidance, eps_u + s (eps_c - eps_u), as the pipelines combine the two halves."""
        unconditional, conditional = output.sample.chunk(2)
        output.sample = unconditional + args.guidance_scale * (conditional - unconditional)

    if sdxl or not w_conditioned:
        unet.register_forward_pre_hook(unet_inputs, with_kwargs=True)
    if negative is not None:
        unet.register_forward_hook(guide)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % vae_scale:
        raise SystemExit(f"error: --resolution must be a multiple of {vae_scale} (got {args.resolution})")
    if args.num_inference_steps > scheduler.config.original_inference_steps:
        raise SystemExit(f"error: --num-inference-steps must be <= {scheduler.config.original_inference_steps}, the "
                         f"steps this LCM was distilled on (got {args.num_inference_steps})")
    latent_shape = (unet.config.in_channels, args.resolution // vae_scale, args.resolution // vae_scale)
    return encode, vae, unet, scheduler, latent_shape


def add_lora(unet, rank: int, alpha: int) -> list[torch.nn.Parameter]:
    """LoRA on the attention projections (B initialised to zero, so the policy starts at the base)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for param in lora_params:  # trainable weights stay fp32 under autocast
        param.data = param.data.float()
    return lora_params


PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"  # the default training and evaluation prompts


def read_prompts(path: str | Path, flag: str = "--prompts-file") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {flag} '{path}' does not exist; pass a file of prompts, one per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: {flag} '{path}' has no prompts; write one prompt per line")
    return prompts


def load_reward_spec(spec: str, device: torch.device, dtype: torch.dtype):
    """'name' or 'name=path' -> a frozen reward module (see common.load_reward)."""
    name, _, path = spec.partition("=")
    try:
        return load_reward(name, path or None, device=device, dtype=dtype)
    except (OSError, ImportError) as error:
        raise SystemExit(f"error: could not load the reward '{spec}' ({first_line(error)}); fix it or leave it out")


def load_eval_rewards(specs, dtype: torch.dtype) -> dict:
    """name -> reward, kept on the CPU between evaluations so that they cost no GPU memory during training."""
    return {spec.partition("=")[0]: load_reward_spec(spec, torch.device("cpu"), dtype) for spec in specs}


def global_mean(values: torch.Tensor, world_size: int) -> float:
    """Mean over every rank's values (nan where there are none, e.g. every online pair was a tie)."""
    total = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def first_line(error: BaseException) -> str:
    return str(error).strip().partition("\n")[0] or type(error).__name__


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from PIL import Image
    n, _, h, w = images.shape
    columns = min(columns, n)
    cells = torch.zeros(-(-n // columns) * columns, 3, h, w)  # empty cells of the last row stay black
    cells[:n] = images.float().cpu()
    grid = cells.reshape(-1, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(-1, columns * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def validate_shared(args, problems: list) -> None:
    """Stop with one line, before anything loads, at the first impossible setting: the shared flags', then the
    script's own (condition, message) pairs."""
    values = {name.replace("_", "-"): value for name, value in asdict(args).items()}
    positive = ["num-inference-steps", "train-steps", "batch-size", "eval-batch-size", "eval-samples-per-prompt", "lr",
                "lora-rank", "lora-alpha", "max-grad-norm", "resolution", "log-every", "checkpoint-limit",
                "max-nonfinite-steps"]
    specs = [spec.partition("=") for spec in (args.reward, *args.eval_rewards)]
    unknown = next((name for name, _, _ in specs if name not in REWARDS), None)
    local = [path for name, _, path in specs if path and name != "imagereward"]  # imagereward's is a file
    missing = next((path for path in local if missing_local_directory(path)), None)
    shared = [
        *((not math.isfinite(value), f"--{name} must be a finite number (got {value})")
          for name, value in values.items() if isinstance(value, float)),
        *((values[name] <= 0, f"--{name} must be > 0 (got {values[name]})") for name in positive),
        *((values[name] < 0, f"--{name} must be >= 0 (got {values[name]})")
          for name in ("weight-decay", "eval-every", "save-every")),
        (args.guidance_scale < 1, f"--guidance-scale must be >= 1 (got {args.guidance_scale}): w = scale - 1"),
        (not 0 <= args.seed < 2**32, f"--seed must be in [0, 2**32) (got {args.seed})"),
        (args.device.split(":")[0] not in ("cuda", "cpu"), f"--device must be cuda or cpu (got {args.device})"),
        (args.device.startswith("cuda") and not torch.cuda.is_available(),
         "CUDA is not available here; pass --device cpu --mixed-precision no (slow)"),
        (unknown, f"unknown reward '{unknown}'; choose one of: {', '.join(REWARDS)}"),
        (missing_local_directory(args.model), f"--model '{args.model}' is not a directory; pass a pipeline "
                                              "directory or a hub id (org/name)"),
        (missing, f"the reward directory '{missing}' does not exist; fix NAME=DIR or pass NAME alone"),
        (Path(args.exp_name).name != args.exp_name or args.exp_name in ("", ".", ".."),
         f"--exp-name '{args.exp_name}' must be a plain name (a directory in --output-dir)"),
        *problems]
    for failed, message in shared:
        if failed:
            raise SystemExit(f"error: {message}")


if __name__ == "__main__":
    main(cli(Args))
