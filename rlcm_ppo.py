"""RLCM: PPO on the policy of a latent consistency model's sampling chain.

Paper: "RL for Consistency Models" (RLCM, Oertell et al. 2024), ROCM's baseline; the reward needs no gradient (JPEG).
The K-1 stochastic LCM steps are the actions, the reward R of the decoded image is the return; PPO minimizes
    E_{n,k} max(-A_n r_nk, -A_n clip(r_nk, 1 - eps, 1 + eps)),  r_nk = p_k(x_{k-1} | x_k, c) / p_k^old(x_{k-1} | x_k, c)
  p_k = N(alpha'_k f_theta(x_k), sigma'^2_k I)     policy_step, policy_mean_std, gaussian_log_prob
  A_n = R_n normalized per prompt, clipped         PerPromptStatTracker, compute_advantages
  the loss; of a minibatch; the whole update       ppo_clipped_loss, PpoObjective, ppo_update
RLCM's own training (one Adam step per iteration, every ratio 1; docs/rlcm_ppo.md: "original RLCM vs rlcm_ppo.py"):
`--sample-batches 1 --grad-accum 0 --weight-decay 0 --lr-schedule linear --lr-end-factor 0.667`.
Run (GPU):  python rlcm_ppo.py --reward jpeg_compressibility --train-steps 100 --track
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

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
    """hub id or local directory of a LatentConsistencyModelPipeline"""
    resolution: int = 512
    """image side in pixels (the ROCM paper's 512; RLCM's code defaulted to 768)"""
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
# ALGORITHM: PPO on the chain's stochastic steps
# --------------------------------------------------------------------------------------------

def policy_step(scheduler, timesteps: torch.Tensor, steps: torch.Tensor, device) -> ChainStep:
    """Each sample n's step at its index steps[n] into the schedule's timesteps. Sampling and training both build
    theirs here, so the first ratio is exactly 1; (B, 1, 1, 1) float32 coefficients keep f float32 under autocast."""
    return chain_step(scheduler, timesteps[steps], timesteps[steps + 1], device)


def policy_mean_std(unet, x, step: ChainStep, prompt_embeds, w_embedding):
    """Mean alpha' f(x_k) and std sigma' of the Gaussian step policy."""
    return step.alpha_next * consistency_fn(unet, x, step, prompt_embeds, w_embedding), step.sigma_next


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample (float32), averaged or summed over dimensions."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, device=x.device).float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * np.log(2 * np.pi)
    return {"mean": log_prob.mean, "sum": log_prob.sum}[reduction](dim=tuple(range(1, x.ndim)))


def ppo_clipped_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate as a loss, the mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)); stats: the ratio
    (detached), approx_kl = mean of (log r)^2 / 2, clip_fraction = share of |r - 1| > eps."""
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)).mean()
    with torch.no_grad():
        return loss, {"ratio": ratio.detach(), "approx_kl": 0.5 * log_ratio.square().mean(),
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
        if len(prompts) != len(values):
            raise ValueError(f"{len(prompts)} prompts for {len(values)} rewards")
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
    values = rewards.float()
    normalized = (values - values.mean()) / (values.std(unbiased=False) + PerPromptStatTracker.EPS)
    return (tracker.update(prompts, rewards) if tracker else normalized).clamp(-adv_clip, adv_clip)


def gather_rewards(rewards: torch.Tensor, prompts: list[str], world_size: int) -> tuple[torch.Tensor, list[str]]:
    """Every rank's rewards and prompts, rank-major, so every rank's stat tracker sees the same global batch."""
    if world_size == 1:
        return rewards, list(prompts)
    parts, prompt_parts = [torch.empty_like(rewards) for _ in range(world_size)], [None] * world_size
    dist.all_gather(parts, rewards.contiguous())
    dist.all_gather_object(prompt_parts, list(prompts))
    return torch.cat(parts), [prompt for part in prompt_parts for prompt in part]


def global_max(values: torch.Tensor, world_size: int) -> float:
    top = values.float().max()
    if world_size > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top.item()


def ppo_minibatches(num_samples: int, num_actions: int, train_batch_size: int, generator: torch.Generator) -> list:
    """A shuffled split of all (sample, step) pairs into minibatches of (sample indices, step indices)."""
    order = torch.randperm(num_samples * num_actions, generator=generator)
    return [(chunk // num_actions, chunk % num_actions) for chunk in order.split(train_batch_size)]


def lr_factor(schedule: str, end_factor: float, iteration: int, iterations: int) -> float:
    """The LR multiplier of iteration i (1..N): 1, or linear 1 - (1 - end_factor) i / N: RLCM's line (its LinearLR
    steps before each epoch of 10 iterations: epoch e trains at 1 - (e + 1) / 300), stepped per iteration here."""
    return 1.0 if schedule == "constant" else 1.0 - (1.0 - end_factor) * iteration / max(iterations, 1)


class PpoObjective(torch.nn.Module):
    """The clipped loss of one minibatch of stored (sample, step) pairs as a single forward, so that
    DistributedDataParallel averages the LoRA gradients of every rank's minibatch."""

    def __init__(self, unet, scheduler, schedule: list[ChainStep], clip_range: float, reduction: str):
        super().__init__()
        self.unet, self.scheduler, self.clip_range, self.reduction = unet, scheduler, clip_range, reduction
        self.timesteps = torch.stack([step.t for step in schedule])

    def forward(self, rollout: Rollout, samples: torch.Tensor, steps: torch.Tensor, w_embedding: torch.Tensor):
        """Recompute log p(x_{k-1} | x_k) of the stored pairs under the current policy; returns (loss, stats)."""
        step = policy_step(self.scheduler, self.timesteps, steps, self.timesteps.device)
        mean, std = policy_mean_std(self.unet, rollout.latents[samples, steps], step, rollout.prompt_embeds[samples],
                                    w_embedding[:len(samples)])
        log_probs = gaussian_log_prob(rollout.next_latents[samples, steps], mean, std, self.reduction)
        return ppo_clipped_loss(log_probs, rollout.log_probs[samples, steps], rollout.advantages[samples],
                                self.clip_range)


def ppo_update(objective, rollout: Rollout, w_embedding: torch.Tensor, epochs: int, train_batch_size: int,
               grad_accum: int, seed: int, iteration: int, optimizer_step: Callable[[bool], Optional[float]],
               backward_pass=lambda last: contextlib.nullcontext(), scale=lambda loss: loss,
               autocast=contextlib.nullcontext(), rank: int = 0) -> dict[str, list]:
    """One iteration's PPO update: `epochs` shuffled passes over the rollout's (sample, step) pairs in minibatches of
    train_batch_size, an optimizer step every grad_accum minibatches (0: one per epoch). optimizer_step(finite: all
    the group's losses were) applies or skips the gradients, zeroes them and returns their norm, None if it skipped
    (Run.update in main, clip_and_step on one process); backward_pass(last) surrounds each forward and backward (DDP:
    no_sync but on the group's last); backward runs on scale(loss). Returns per-minibatch stats, grad_norm per step."""
    (num_samples, num_actions), device = rollout.log_probs.shape, rollout.latents.device
    stats = {"loss": [], "approx_kl": [], "clip_fraction": [], "ratio_deviation": [], "grad_norm": []}
    for epoch in range(epochs):
        shuffle = torch.Generator().manual_seed(derived_seed(seed, iteration, epoch, rank))
        minibatches = ppo_minibatches(num_samples, num_actions, train_batch_size, shuffle)
        group_size = grad_accum or len(minibatches)
        # every rank has as many minibatches, so DDP's all-reduces (on each group's last backward) line up
        for group_start in range(0, len(minibatches), group_size):
            group, finite = minibatches[group_start:group_start + group_size], True
            for position, (samples, steps) in enumerate(group):
                with backward_pass(position == len(group) - 1):
                    with autocast:
                        loss, info = objective(rollout, samples.to(device), steps.to(device), w_embedding)
                    finite &= torch.isfinite(loss).item()  # a non-finite loss still runs backward: ranks stay in step
                    scale(loss / len(group)).backward()
                info.update(loss=loss.detach(), ratio_deviation=(info.pop("ratio") - 1.0).abs().max())
                for name, value in info.items():
                    stats[name].append(value)
            if (grad_norm := optimizer_step(finite)) is not None:
                stats["grad_norm"].append(grad_norm)
    return stats


def clip_and_step(optimizer, params: list[torch.nn.Parameter], max_grad_norm: float):
    """ppo_update's optimizer_step on one process without a loss scale (main's is Run.update): clip, step if finite."""
    def step(finite: bool) -> Optional[float]:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        finite = finite and torch.isfinite(grad_norm).item()
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.item() if finite else None
    return step


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
    offline_if_hub_unreachable([args.model, args.reward, *args.eval_rewards])
    train_prompts = read_prompts(args.prompts_file or PROMPTS_DIR / "train.txt")
    eval_prompts = read_prompts(args.eval_prompts_file or PROMPTS_DIR / "eval.txt", "--eval-prompts-file")
    run = Run(args, unit="iteration")  # rank and device; a --resume checkpoint is checked before models load
    device = run.device

    # ---- models: the LCM with a LoRA (the policy), the reward (any: PPO needs no gradient of it)
    tokenizer, text_encoder, vae, unet, scheduler = load_lcm(args.model, device, run.dtype)
    latent_shape = check_model(args, tokenizer, vae, unet, scheduler, train_prompts + eval_prompts, run.is_main)
    reward_fn = load_reward_spec(args.reward, device, run.dtype)
    eval_rewards = load_eval_rewards(args.eval_rewards, run.dtype) if run.is_main else {}
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    unet.eval()  # throughout: PPO's ratio compares sampling and training policy, so both are one function
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, device)
    objective = PpoObjective(unet, scheduler, schedule, args.clip_range, args.logprob_reduction)
    sample_w, train_w = (guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, n, device)
                         for n in (args.batch_size, args.train_batch_size))
    tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)  # used if --per-prompt-stat-tracking
    num_samples = args.batch_size * args.sample_batches  # per rank and iteration
    images = num_samples * run.world_size  # per iteration, each scored once
    accumulation = args.grad_accum or num_samples * (args.num_inference_steps - 1) // args.train_batch_size
    start, objective = run.begin(unet, optimizer, objective, f"{args.train_batch_size} (sample, step) pairs x "
                                 f"{accumulation} accumulation x {run.world_size} ranks = "
                                 f"{args.train_batch_size * accumulation * run.world_size} pairs per optimizer step; "
                                 f"{args.batch_size} x {args.sample_batches} sampling batches x {run.world_size} "
                                 f"ranks = {images} images")
    if (run.resumed or {}).get("stat_tracker"):
        tracker.load_state_dict(run.resumed["stat_tracker"])

    def sample(latents, noises, embeds, w_embedding):  # the policy's K-step chain without gradients, for evaluation
        return sample_with_logprobs(unet, scheduler, latents, noises, schedule, embeds, w_embedding, ()).final_latents

    def evaluate_now(step: int) -> None:
        run.evaluate(step, sample, (tokenizer, text_encoder, vae, unet), eval_prompts, eval_rewards, latent_shape,
                     len(schedule))

    if start == 0:
        evaluate_now(0)
    for iteration in range(start + 1, args.train_steps + 1):
        started = time.perf_counter()
        run.snapshot(iteration - 1, stat_tracker=tracker.state_dict())  # kept while the last with a finite loss
        # ---- sample: every stochastic step's log-prob, the rewards, advantages normalized over all ranks' samples
        rollouts = []
        for batch_index in range(args.sample_batches):
            prompts, latents, noises = micro_batch(args.seed, train_prompts, iteration, batch_index, args.batch_size,
                                                   run.rank, run.world_size, latent_shape, len(schedule), device)
            with torch.no_grad(), run.autocast:
                embeds = encode_prompts(tokenizer, text_encoder, prompts)
                rollouts.append(sample_with_logprobs(unet, scheduler, latents, noises, schedule, embeds, sample_w,
                                                     prompts, args.logprob_reduction))
                rollouts[-1].rewards = reward_fn(decode(vae, rollouts[-1].final_latents), prompts).float()
        rollout = Rollout.cat(rollouts)
        all_rewards, all_prompts = gather_rewards(rollout.rewards, rollout.prompts, run.world_size)
        advantages = compute_advantages(all_rewards, all_prompts, args.per_prompt_stat_tracking and tracker,
                                        args.adv_clip)
        rollout.advantages = advantages[run.rank * num_samples:(run.rank + 1) * num_samples]
        sampling_time = time.perf_counter() - started
        # ---- update: PPO epochs at the iteration's LR (--resume continues it); non-finite steps skipped on all ranks
        optimizer.param_groups[0]["lr"] = args.lr * lr_factor(args.lr_schedule, args.lr_end_factor, iteration,
                                                              args.train_steps)
        stats = ppo_update(objective, rollout, train_w, args.ppo_epochs, args.train_batch_size, args.grad_accum,
                           args.seed, iteration, rank=run.rank, autocast=run.autocast, scale=run.grad_scaler.scale,
                           optimizer_step=lambda finite: run.update(iteration, finite, lora_params, args.max_grad_norm),
                           backward_pass=lambda last: run.backward_pass(objective, iteration, last))
        step_time = time.perf_counter() - started
        # ---- log: means over every rank's minibatches (grad_norm: over the steps taken; nan if none)
        if iteration % args.log_every == 0:
            metrics = {f"train/{name}": global_mean(torch.tensor([float(v) for v in stats[name]], device=device),
                                                     run.world_size)
                       for name in ("loss", "approx_kl", "clip_fraction", "grad_norm")}
            metrics.update({
                "train/reward": all_rewards.mean().item(), "train/reward_std": all_rewards.std(unbiased=False).item(),
                "train/advantage_abs": advantages.abs().mean().item(), "perf/sampling_time_s": sampling_time,
                "train/per_prompt_fraction": tracker.last_per_prompt_fraction, "train/skipped_steps": run.skipped,
                "train/ratio_max_deviation": global_max(torch.stack(stats["ratio_deviation"]), run.world_size),
                "train/lr": optimizer.param_groups[0]["lr"], "train/optimizer_steps": len(stats["grad_norm"])})
            run.log_step(iteration, metrics, "reward {train/reward:.4f} +- {train/reward_std:.4f} approx_kl "
                         "{train/approx_kl:.3g} clip_fraction {train/clip_fraction:.3f}".format_map(metrics),
                         step_time, images, images)
        # ---- save and evaluate
        run.save(iteration, stat_tracker=tracker.state_dict())
        if args.eval_every and iteration % args.eval_every == 0 and iteration != args.train_steps:
            evaluate_now(iteration)
    run.finish(lora_params, lambda: evaluate_now(args.train_steps))


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE (rlcm_ppo only): the flags that define a run, the checks of the flags
# --------------------------------------------------------------------------------------------

# --resume refuses other values of these than the checkpoint's (ranks count: each shuffles its own samples)
RUN_FLAGS = ("model", "reward", "resolution", "num_inference_steps", "guidance_scale", "lora_rank", "lora_alpha",
             "seed", "batch_size", "world_size", "sample_batches", "train_batch_size", "grad_accum",
             "logprob_reduction", "per_prompt_stat_tracking", "stat_buffer_size", "stat_min_count")
# what an out-of-memory error tells the user to change
OOM_FIX = "lower --train-batch-size (raise --grad-accum to keep the pairs per update), --batch-size or --resolution"


def validate(args: Args) -> None:
    """Reject impossible settings with a one-line message before anything is loaded."""
    pairs = args.batch_size * args.sample_batches * (args.num_inference_steps - 1)  # (sample, step) per iteration
    validate_shared(args, [
        (not 0 <= args.lr_end_factor <= 1, f"--lr-end-factor must be in [0, 1] (got {args.lr_end_factor})"),
        (args.stat_min_count > args.stat_buffer_size,
         f"--stat-min-count ({args.stat_min_count}) must be <= --stat-buffer-size ({args.stat_buffer_size})"),
        (args.train_batch_size > 0 and pairs % args.train_batch_size,  # below 1 is the bounds' error
         f"--train-batch-size ({args.train_batch_size}) must divide the (sample, step) pairs per iteration, "
         f"batch_size x sample_batches x (K-1) = {args.batch_size} x {args.sample_batches} x "
         f"{args.num_inference_steps - 1} = {pairs}"),
    ], num_inference_steps=">= 2; the K-1 stochastic steps are PPO's actions", sample_batches=">= 1",
        train_batch_size=">= 1", grad_accum=">= 0; 0: one optimizer step per epoch", ppo_epochs=">= 1",
        clip_range="> 0", adv_clip="> 0", stat_buffer_size=">= 1", stat_min_count=">= 1")


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
