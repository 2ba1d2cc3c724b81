"""RLCM: PPO on the policy of a latent consistency model's sampling chain.

Paper: "RL for Consistency Models" (RLCM, Oertell et al. 2024), ROCM's baseline; the reward needs no gradient (JPEG).
The K-1 stochastic LCM steps are the actions, the reward R of the decoded image is the return; PPO minimizes
    E_{n,k} max(-A_n r_nk, -A_n clip(r_nk, 1 - eps, 1 + eps)),  r_nk = p_k(x_{k-1} | x_k, c) / p_k^old(x_{k-1} | x_k, c)
  p_k = N(alpha'_k f_theta(x_k), sigma'^2_k I)     policy_step, policy_mean_std, gaussian_log_prob
  A_n = R_n normalized per prompt, clipped         PerPromptStatTracker, compute_advantages
  the loss; of a minibatch; the update's order     ppo_clipped_loss, PpoObjective, ppo_minibatches (loop: main)
RLCM's own training (one Adam step per iteration, every ratio 1; docs/rlcm_ppo.md: "original RLCM vs rlcm_ppo.py"):
`--sample-batches 1 --grad-accum 0 --weight-decay 0 --lr-schedule linear --lr-end-factor 0.667`.
Run (GPU):  python rlcm_ppo.py --reward jpeg_compressibility --train-steps 100 --track
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
import tyro

from common import REWARDS, load_reward, missing_local_directory

@dataclass
class Args:
    # algorithm
    reward: str = "aesthetic"
    """reward to maximize: NAME or NAME=PATH of common.py, with or without gradient (jpeg_compressibility, ...)"""
    clip_range: float = 1e-4
    """PPO clip range eps on the ratio; 1e-4 fits the mean reduction (sum: num_latent_dims times larger log-ratios)"""
    adv_clip: float = 10.0
    """advantages are clipped to [-adv_clip, adv_clip]"""
    logprob_reduction: Literal["mean", "sum"] = "mean"
    """log-prob over latent dimensions: mean (RLCM; resolution-independent ratio) or sum (the true log-density)"""
    per_prompt_stat_tracking: bool = True
    """normalize rewards per prompt (buffer + minimum count, global fallback); off: global batch mean/std"""
    stat_buffer_size: int = 32
    """rewards kept per prompt for per-prompt normalization"""
    stat_min_count: int = 16
    """a prompt's own mean/std is used once it has this many stored rewards; before, the iteration's global ones"""
    train_steps: int = 100
    """PPO iterations (each: sample, score, --ppo-epochs passes of minibatch updates); RLCM ran 1000"""
    batch_size: int = 8
    """images per sampling batch (RLCM: 8 per GPU for aesthetic, 4 for compressibility)"""
    sample_batches: int = 4
    """sampling batches per PPO iteration (RLCM: 1)"""
    train_batch_size: int = 2
    """(sample, step) pairs per training minibatch; must divide batch_size x sample_batches x (K-1)"""
    grad_accum: int = 4
    """minibatches per optimizer step (a shorter last group ends an epoch); 0: one step per epoch (RLCM)"""
    ppo_epochs: int = 1
    """passes over the iteration's (sample, step) pairs, reshuffled each time (RLCM: 1)"""
    lr: float = 1e-4
    """AdamW learning rate (RLCM: 1e-4)"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """LR over the iterations: constant, or at iteration i of N lr x (1 - (1 - lr_end_factor) i / N) (RLCM: linear)"""
    lr_end_factor: float = 0.0
    """--lr-schedule linear: the LR factor at the last iteration (RLCM: 2/3, its LinearLR to 0 over 3x its run)"""
    weight_decay: float = 1e-4
    """AdamW weight decay on the LoRA weights (DDPO's 1e-4; RLCM used Adam without weight decay: 0)"""
    max_grad_norm: float = 5.0
    """gradient clipping threshold (global L2 norm)"""
    num_inference_steps: int = 8
    """K, the number of LCM sampling steps; the K-1 stochastic ones are PPO's actions (K >= 2)"""
    guidance_scale: float = 8.5
    """LCM guidance scale, w = guidance_scale - 1; 8.5 as in ROCM, so both start from the same policy (RLCM: 8.0)"""
    lora_rank: int = 16
    """LoRA rank on the UNet attention projections (RLCM's compression config; its aesthetic config used 8)"""
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
    """image side in pixels (the ROCM paper's 512; RLCM's code defaulted to 768)"""
    gradient_checkpointing: bool = True
    """recompute each UNet call in the backward pass instead of storing its activations"""
    exp_name: str = Path(__file__).stem
    """name of this experiment (run directory and wandb run name)"""
    seed: int = 0
    """seed of the sampling noise, the prompt draws and the minibatch shuffling (all derived from seed and iteration)"""
    device: str = "cuda"
    """torch device to train on"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """autocast dtype; frozen weights are stored in it, LoRA weights stay fp32"""
    prompts_file: Optional[str] = None
    """training prompts, one per line (unset: the repo's prompts/train.txt)"""
    eval_prompts_file: Optional[str] = None
    """held-out evaluation prompts, one per line (unset: the repo's prompts/eval.txt)"""
    eval_rewards: tuple[str, ...] = ("pickscore", "hpsv2", "clipscore", "aesthetic")
    """rewards scored on held-out prompts, NAME or NAME=PATH; ones that cannot be loaded are skipped with a warning"""
    eval_batch_size: int = 8
    """images per batch during evaluation"""
    eval_samples_per_prompt: int = 2
    """samples per held-out prompt, each from its own chain noise; eval/diversity compares them (2 or more)"""
    max_nonfinite_steps: int = 10
    """stop after this many consecutive optimizer steps with a non-finite loss or gradient (each is skipped)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "cm-alignment"
    """wandb project name"""
    wandb_entity: Optional[str] = None
    """wandb entity (team)"""
    output_dir: str = "runs"
    """where run directories (LoRA weights, sample grids, metrics) are written"""
    log_every: int = 1
    """print and log training metrics every this many PPO iterations"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many PPO iterations (0: only at the start and end)"""
    save_every: int = 0
    """save a resumable checkpoint (LoRA, optimizer, reward statistics) every this many PPO iterations (0: never)"""
    checkpoint_limit: int = 3
    """keep at most this many checkpoints (the oldest are deleted)"""
    resume: Optional[str] = None
    """continue from a checkpoint directory, or from the latest checkpoint of a run directory"""


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
# ALGORITHM: PPO on the chain's stochastic steps
# --------------------------------------------------------------------------------------------

def policy_step(scheduler, timesteps: torch.Tensor, steps: torch.Tensor, device) -> ChainStep:
    """Each sample n's step at its index steps[n] into the schedule's timesteps. Sampling and training both build
    theirs here, so the first ratio is exactly 1; (B, 1, 1, 1) float32 coefficients keep f float32 under autocast."""
    return chain_step(scheduler, timesteps[steps], timesteps[steps + 1], device)


def policy_mean_std(unet, x, step: ChainStep, prompt_embeds, w_embedding, gradient_checkpointing: bool = False):
    """Mean alpha' f(x_k) and std sigma' of the Gaussian step policy (f recomputed in backward if checkpointed)."""
    f = unet_call(consistency_fn, gradient_checkpointing, unet, x, step, prompt_embeds, w_embedding)
    return step.alpha_next * f, step.sigma_next


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample (float32), averaged or summed over dimensions."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, device=x.device).float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * np.log(2 * np.pi)
    return {"mean": log_prob.mean, "sum": log_prob.sum}[reduction](dim=tuple(range(1, x.ndim)))


def ppo_clipped_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate as a loss, the mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)); stats: approx_kl =
    mean of (log r)^2 / 2, clip_fraction = share of |r - 1| > eps, ratio_deviation = max |r - 1|."""
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)).mean()
    with torch.no_grad():
        return loss, {"approx_kl": 0.5 * log_ratio.square().mean(), "ratio_deviation": (ratio - 1.0).abs().max(),
                      "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean()}


@dataclass
class Rollout:
    """Sampled trajectories: per sample and stochastic step the x before it, the x it sampled and its log-prob."""
    prompts: list[str]
    prompt_embeds: torch.Tensor  # (N, L, D)
    latents: torch.Tensor  # (N, K-1, C, H, W), x before each stochastic step
    next_latents: torch.Tensor  # (N, K-1, C, H, W), x after it
    log_probs: torch.Tensor  # (N, K-1)
    final_latents: torch.Tensor  # (N, C, H, W), the deterministic last step's output
    rewards: Optional[torch.Tensor] = None  # (N,)
    advantages: Optional[torch.Tensor] = None  # (N,)

    @staticmethod
    def cat(rollouts: Sequence["Rollout"]) -> "Rollout":  # a field that some rollout lacks (advantages) stays None
        tensors = {f.name: [getattr(r, f.name) for r in rollouts] for f in fields(Rollout) if f.name != "prompts"}
        return Rollout([prompt for r in rollouts for prompt in r.prompts],
                       **{name: None if any(t is None for t in ts) else torch.cat(ts) for name, ts in tensors.items()})


@torch.no_grad()
def sample_with_logprobs(unet, scheduler, latents, noises, schedule: list[ChainStep], prompt_embeds, w_embedding,
                         prompts, reduction: str = "mean") -> Rollout:
    """The K-step chain without gradients, keeping every stochastic step's (x_k, x_{k-1}, log-prob): x_{k-1} =
    alpha' f(x_k) + sigma' z as LatentConsistencyModelPipeline samples (bit-exact for the same noise); the last step,
    f(x_1) without noise, is no action."""
    xs, log_probs, batch = [latents], [], latents.shape[0]
    timesteps = torch.stack([step.t for step in schedule])
    for k in range(len(schedule) - 1):
        step = policy_step(scheduler, timesteps, torch.full((batch,), k, device=timesteps.device), latents.device)
        mean, std = policy_mean_std(unet, xs[-1], step, prompt_embeds, w_embedding)
        xs.append((mean + std * noises[k]).float())
        log_probs.append(gaussian_log_prob(xs[-1], mean, std, reduction))
    last = chain_step(scheduler, timesteps[-1].repeat(batch), None, latents.device)
    final = consistency_fn(unet, xs[-1], last, prompt_embeds, w_embedding).float()
    return Rollout(list(prompts), prompt_embeds, latents=torch.stack(xs[:-1], 1), next_latents=torch.stack(xs[1:], 1),
                   log_probs=torch.stack(log_probs, 1), final_latents=final)


class PerPromptStatTracker:
    """Per-prompt reward normalization (DDPO / RLCM), its state a JSON-serializable dict. A batch's rewards of a
    prompt join its buffer (its last `buffer_size` rewards) first; once that holds `min_count` rewards they are
    normalized with the buffer's mean and (population) std, before that with the whole batch's."""

    EPS = 1e-6  # added to the std, as in DDPO

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}
        self.last_per_prompt_fraction = 0.0  # share of the last batch normalized with its prompt's own stats

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        values, prompt_of = rewards.detach().double().cpu().numpy(), np.array(prompts, dtype=object)
        advantages, per_prompt = (values - values.mean()) / (values.std() + self.EPS), 0  # the batch's stats first
        for prompt in dict.fromkeys(prompts):  # unique, in order of appearance
            mask = prompt_of == prompt
            buffer = self.buffers[prompt] = (self.buffers.get(prompt, []) + values[mask].tolist())[-self.buffer_size:]
            if len(buffer) >= self.min_count:
                advantages[mask] = (values[mask] - np.mean(buffer)) / (np.std(buffer) + self.EPS)
                per_prompt += int(mask.sum())
        self.last_per_prompt_fraction = per_prompt / max(len(values), 1)
        return torch.as_tensor(advantages, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict:  # update replaces a buffer, never changes it: the lists can be shared
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.buffers = {prompt: list(values)[-self.buffer_size:] for prompt, values in state["buffers"].items()}


def compute_advantages(rewards: torch.Tensor, prompts: Sequence[str], tracker: Optional[PerPromptStatTracker],
                       adv_clip: float) -> torch.Tensor:
    """Normalized, clipped advantages: per prompt with a tracker, else with the batch's mean and std."""
    if tracker is not None:
        return tracker.update(prompts, rewards).clamp(-adv_clip, adv_clip)
    values = rewards.float()
    normalized = (values - values.mean()) / (values.std(unbiased=False) + PerPromptStatTracker.EPS)
    return normalized.clamp(-adv_clip, adv_clip)


def gather_rewards(rewards: torch.Tensor, prompts: list[str], world_size: int) -> tuple[torch.Tensor, list[str]]:
    """Every rank's rewards and prompts, rank-major, so every rank's stat tracker sees the same global batch."""
    if world_size == 1:
        return rewards, list(prompts)
    parts = [torch.empty_like(rewards) for _ in range(world_size)]
    prompt_parts = [None] * world_size
    dist.all_gather(parts, rewards.contiguous())
    dist.all_gather_object(prompt_parts, list(prompts))
    return torch.cat(parts), [prompt for part in prompt_parts for prompt in part]


def ppo_minibatches(num_samples: int, num_actions: int, train_batch_size: int, generator: torch.Generator) -> list:
    """A shuffled split of all (sample, step) pairs into minibatches of (sample indices, step indices)."""
    order = torch.randperm(num_samples * num_actions, generator=generator)
    return [(chunk // num_actions, chunk % num_actions) for chunk in order.split(train_batch_size)]


def accumulation_groups(minibatches: list, grad_accum: int) -> list[list]:
    """The minibatches of each optimizer step: grad_accum at a time (the last group may be shorter), 0: all."""
    size = grad_accum if grad_accum > 0 else len(minibatches)
    return [minibatches[start:start + size] for start in range(0, len(minibatches), size)]


def lr_factor(schedule: str, end_factor: float, iteration: int, iterations: int) -> float:
    """The LR multiplier of iteration i (1..N): 1, or linear 1 - (1 - end_factor) i / N: RLCM's line (its LinearLR
    steps before each epoch of 10 iterations: epoch e trains at 1 - (e + 1) / 300), stepped per iteration here."""
    return 1.0 if schedule == "constant" else 1.0 - (1.0 - end_factor) * iteration / max(iterations, 1)


class PpoObjective(torch.nn.Module):
    """The clipped loss of one minibatch of stored (sample, step) pairs as a single forward, so that
    DistributedDataParallel averages the LoRA gradients of every rank's minibatch."""

    def __init__(self, unet, scheduler, schedule: list[ChainStep], clip_range: float, reduction: str,
                 gradient_checkpointing: bool = True):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.timesteps = torch.stack([step.t for step in schedule])
        self.clip_range = clip_range
        self.reduction = reduction
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, rollout: Rollout, samples: torch.Tensor, steps: torch.Tensor, w_embedding: torch.Tensor):
        """Recompute log p(x_{k-1} | x_k) of the stored pairs under the current policy; returns (loss, stats)."""
        step = policy_step(self.scheduler, self.timesteps, steps, self.timesteps.device)
        mean, std = policy_mean_std(self.unet, rollout.latents[samples, steps], step, rollout.prompt_embeds[samples],
                                    w_embedding[:len(samples)], self.gradient_checkpointing)
        log_probs = gaussian_log_prob(rollout.next_latents[samples, steps], mean, std, self.reduction)
        return ppo_clipped_loss(log_probs, rollout.log_probs[samples, steps], rollout.advantages[samples],
                                self.clip_range)


def micro_batch(seed: int, prompts: list[str], step: int, micro: int, batch_size: int, rank: int, world_size: int,
                latent_shape: tuple, num_steps: int, device):
    """This rank's slice of the global micro-batch: its prompts, initial latents and chain noise.

    Every sample's noise depends only on its global index, so N ranks with batch b see exactly the samples one
    process with batch N*b sees.
    """
    chosen = random.Random(derived_seed(seed, step, micro)).choices(prompts, k=batch_size * world_size)
    mine = range(rank * batch_size, (rank + 1) * batch_size)
    draws = [draw_chain_noise((1, *latent_shape), num_steps,
                              torch.Generator(device=device).manual_seed(derived_seed(seed, step, micro, i)), device)
             for i in mine]
    latents = torch.cat([latent for latent, _ in draws])
    noises = [torch.cat(per_step) for per_step in zip(*[noise for _, noise in draws])]
    return [chosen[i] for i in mine], latents, noises


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    validate(args)
    train_prompts = read_prompts(args.prompts_file or PROMPTS_DIR / "train.txt")
    eval_prompts = read_prompts(args.eval_prompts_file or PROMPTS_DIR / "eval.txt", "--eval-prompts-file")
    run = Run(args, unit="iteration")  # rank and device; a --resume checkpoint is checked before models load
    device = run.device

    # ---- models: the LCM with a LoRA (the policy), the reward (any: PPO needs no gradient of it)
    encode, vae, unet, scheduler, latent_shape = load_lcm(args, device, run.dtype)
    reward_fn = load_reward_spec(args.reward, device, run.dtype)
    eval_rewards = load_eval_rewards(args.eval_rewards, run.dtype) if run.is_main else {}
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    unet.eval()  # throughout: PPO's ratio compares sampling and training policy, so both are one function
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, device)
    objective = PpoObjective(unet, scheduler, schedule, args.clip_range, args.logprob_reduction,
                             args.gradient_checkpointing)
    sample_w = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, args.batch_size, device)
    train_w = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, args.train_batch_size, device)
    tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    num_samples = args.batch_size * args.sample_batches  # per rank and iteration
    num_actions = args.num_inference_steps - 1  # the stochastic steps of each sample
    images = num_samples * run.world_size  # per iteration, each scored once
    accumulation = args.grad_accum if args.grad_accum else num_samples * num_actions // args.train_batch_size
    start, objective = run.begin(unet, optimizer, objective, f"{args.train_batch_size} (sample, step) pairs x "
                                 f"{accumulation} accumulation x {run.world_size} ranks = "
                                 f"{args.train_batch_size * accumulation * run.world_size} pairs per optimizer step; "
                                 f"{args.batch_size} x {args.sample_batches} sampling batches x {run.world_size} "
                                 f"ranks = {images} images")
    if run.resumed:
        tracker.load_state_dict(run.resumed["stat_tracker"])

    def sample(latents, noises, embeds, w_embedding):  # the policy's K-step chain without gradients, for evaluation
        return sample_with_logprobs(unet, scheduler, latents, noises, schedule, embeds, w_embedding, ()).final_latents

    def evaluate_now(step: int) -> None:
        run.evaluate(step, sample, (encode, vae, unet), eval_prompts, eval_rewards, latent_shape,
                     len(schedule))

    if start == 0:
        evaluate_now(0)
    for iteration in range(start + 1, args.train_steps + 1):
        started = time.perf_counter()
        # ---- sample: every stochastic step's log-prob, the rewards, advantages normalized over all ranks' samples
        rollouts = []
        for batch_index in range(args.sample_batches):
            prompts, latents, noises = micro_batch(args.seed, train_prompts, iteration, batch_index, args.batch_size,
                                                   run.rank, run.world_size, latent_shape, len(schedule), device)
            with torch.no_grad(), run.autocast:
                embeds = encode(prompts)
                rollouts.append(sample_with_logprobs(unet, scheduler, latents, noises, schedule, embeds, sample_w,
                                                     prompts, args.logprob_reduction))
                rollouts[-1].rewards = reward_fn(decode(vae, rollouts[-1].final_latents), prompts).float()
        rollout = Rollout.cat(rollouts)
        all_rewards, all_prompts = gather_rewards(rollout.rewards, rollout.prompts, run.world_size)
        advantages = compute_advantages(all_rewards, all_prompts, tracker if args.per_prompt_stat_tracking else None,
                                        args.adv_clip)
        rollout.advantages = advantages[run.rank * num_samples:(run.rank + 1) * num_samples]
        sampling_time = time.perf_counter() - started
        # ---- update: PPO epochs at the iteration's LR (--resume continues it); non-finite steps skipped on all ranks
        optimizer.param_groups[0]["lr"] = args.lr * lr_factor(args.lr_schedule, args.lr_end_factor, iteration,
                                                              args.train_steps)
        infos = []  # per minibatch: its loss and ppo_clipped_loss's stats
        grad_norms = []  # per optimizer step taken
        for epoch in range(args.ppo_epochs):  # each a new shuffle of the (sample, step) pairs
            shuffle = torch.Generator().manual_seed(derived_seed(args.seed, iteration, epoch, run.rank))
            order = ppo_minibatches(num_samples, num_actions, args.train_batch_size, shuffle)
            for group in accumulation_groups(order, args.grad_accum):  # as many on each rank: all-reduces line up
                finite = True
                for position, (samples, steps) in enumerate(group):
                    with run.backward_pass(objective, iteration, last=position == len(group) - 1):
                        with run.autocast:
                            loss, info = objective(rollout, samples.to(device), steps.to(device), train_w)
                        finite &= torch.isfinite(loss).item()  # a non-finite loss still runs backward: ranks in step
                        run.grad_scaler.scale(loss / len(group)).backward()
                    infos.append({"loss": loss.detach(), **info})
                grad_norm = run.update(iteration, finite, lora_params, args.max_grad_norm)
                if grad_norm is not None:  # None: skipped on every rank
                    grad_norms.append(grad_norm)
        step_time = time.perf_counter() - started
        # ---- log: means over every rank's minibatches (grad_norm: over the steps taken; nan if none)
        if iteration % args.log_every == 0:
            metrics = {f"train/{name}": global_mean(torch.stack([info[name] for info in infos]), run.world_size)
                       for name in ("loss", "approx_kl", "clip_fraction")}
            metrics.update({
                "train/reward": all_rewards.mean().item(), "train/reward_std": all_rewards.std(unbiased=False).item(),
                "train/advantage_abs": advantages.abs().mean().item(), "perf/sampling_time_s": sampling_time,
                "train/per_prompt_fraction": tracker.last_per_prompt_fraction, "train/skipped_steps": run.skipped,
                "train/ratio_max_deviation": global_max([info["ratio_deviation"] for info in infos], run.world_size),
                "train/grad_norm": global_mean(torch.tensor(grad_norms, device=device), run.world_size),
                "train/lr": optimizer.param_groups[0]["lr"], "train/optimizer_steps": len(grad_norms)})
            run.log_step(iteration, metrics, "reward {train/reward:.4f} +- {train/reward_std:.4f} approx_kl "
                         "{train/approx_kl:.3g} clip_fraction {train/clip_fraction:.3f}".format_map(metrics),
                         step_time, images, images)
        # ---- save and evaluate
        run.save(iteration, stat_tracker=tracker.state_dict())
        if args.eval_every and iteration % args.eval_every == 0 and iteration != args.train_steps:
            evaluate_now(iteration)
    run.finish(lora_params, lambda: evaluate_now(args.train_steps))


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE (rlcm_ppo only): the flags that define a run, the checks of the flags, the max over ranks
# --------------------------------------------------------------------------------------------

# --resume refuses other values of these than the checkpoint's (ranks count: each shuffles its own samples)
RUN_FLAGS = ("model", "unet", "lcm_lora", "reward", "resolution", "num_inference_steps", "guidance_scale",
             "lora_rank", "lora_alpha", "seed", "batch_size", "world_size", "sample_batches", "train_batch_size",
             "grad_accum", "logprob_reduction", "per_prompt_stat_tracking", "stat_buffer_size", "stat_min_count")
# what an out-of-memory error tells the user to change
OOM_FIX = "lower --train-batch-size (raise --grad-accum to keep the pairs per update), --batch-size or --resolution"


def validate(args: Args) -> None:
    """Reject impossible settings with a one-line message before anything is loaded."""
    pairs = args.batch_size * args.sample_batches * (args.num_inference_steps - 1)  # (sample, step) per iteration
    validate_shared(args, [
        (args.num_inference_steps < 2, f"--num-inference-steps must be >= 2 (got {args.num_inference_steps}; "
                                       "the K-1 stochastic steps are PPO's actions)"),
        (args.sample_batches < 1, f"--sample-batches must be >= 1 (got {args.sample_batches})"),
        (args.train_batch_size < 1, f"--train-batch-size must be >= 1 (got {args.train_batch_size})"),
        (args.grad_accum < 0, f"--grad-accum must be >= 0 (got {args.grad_accum}; 0: one optimizer step per epoch)"),
        (args.ppo_epochs < 1, f"--ppo-epochs must be >= 1 (got {args.ppo_epochs})"),
        (args.clip_range <= 0, f"--clip-range must be > 0 (got {args.clip_range})"),
        (args.adv_clip <= 0, f"--adv-clip must be > 0 (got {args.adv_clip})"),
        (args.stat_buffer_size < 1, f"--stat-buffer-size must be >= 1 (got {args.stat_buffer_size})"),
        (args.stat_min_count < 1, f"--stat-min-count must be >= 1 (got {args.stat_min_count})"),
        (args.stat_min_count > args.stat_buffer_size,
         f"--stat-min-count ({args.stat_min_count}) must be <= --stat-buffer-size ({args.stat_buffer_size})"),
        (not 0 <= args.lr_end_factor <= 1, f"--lr-end-factor must be in [0, 1] (got {args.lr_end_factor})"),
        (args.train_batch_size >= 1 and pairs % args.train_batch_size != 0,
         f"--train-batch-size ({args.train_batch_size}) must divide the {pairs} (sample, step) pairs per iteration, "
         f"--batch-size x --sample-batches x (K-1) = {args.batch_size} x {args.sample_batches} x "
         f"{args.num_inference_steps - 1}"),
    ])


def global_max(values: list[torch.Tensor], world_size: int) -> float:
    """The largest of every rank's values (scalar tensors)."""
    top = torch.stack(values).float().max()
    if world_size > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top.item()


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
