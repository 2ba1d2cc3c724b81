"""ROCM with KL regularization: reward backpropagated through the whole LCM sampling chain.

Paper: "RLHF on Consistency Models" (ROCM). Every LCM step but the last is a Gaussian policy p_k(x_{k-1} | x_k, c)
= N(alpha'_k f_theta(x_k), sigma'^2_k I), reparameterized (x_{k-1} = alpha' f_theta(x_k) + sigma' z), so the reward
of the final image is differentiable in the LoRA weights through all K steps. With the frozen base (the UNet with
its LoRA off) as reference, ROCM maximizes

    J(theta) = E_z [ R(decode(x_0), c) - beta * sum_{k=1}^{K-1} KL(p_k(. | theta, x_k) || p_k(. | ref, x_k)) ]

    the chain x_K -> x_0 ........................ sample_chain (lcm_schedule, consistency_fn: the LCM's f)
    KL of two Gaussians with equal std .......... common.gaussian_divergence("kl"): ||alpha'(f - f_ref)||^2 / 2 sigma'^2
    -J, averaged over the batch ................. rocm_loss;  chain + decode + reward as one forward: RocmObjective

Run (GPU):  python rocm_kl.py --reward pickscore --beta 1e-4 --train-steps 2000 --track
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
import tyro

from common import DIFFERENTIABLE_REWARDS, REWARDS, gaussian_divergence, load_reward, missing_local_directory

@dataclass
class Args:
    # algorithm
    reward: str = "pickscore"
    """reward to maximize, NAME or NAME=PATH (hub id or local dir), differentiable: pickscore, hpsv2, clipscore, ..."""
    beta: float = 0.01
    """KL weight; the paper's rule: beta * KL about one order of magnitude below the reward"""
    reference_grad: bool = True
    """differentiate the reference's mean through x_k too: the KL's exact gradient (off: a cheaper biased surrogate)"""
    train_steps: int = 1000
    """number of optimizer steps"""
    batch_size: int = 1
    """images per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 6e-5
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    prompts_file: Optional[str] = None
    """training prompts, one per line (unset: the repo's prompts/train.txt)"""
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
    checkpoint_decode: bool = False
    """also recompute the VAE decode and the reward in the backward pass (less memory at high resolution)"""
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
# ALGORITHM: ROCM's objective, the KL-regularized reward of the chain
# --------------------------------------------------------------------------------------------

def sample_chain(unet, latents, noises, schedule: list[ChainStep], prompt_embeds, w_embedding,
                 with_kl: bool = False, reference_grad: bool = True, checkpoint: bool = False):
    """Run the K-step chain with gradients; return (final latent x_0, per-sample sum of step KLs, 0 without with_kl).

    The reference's mean is the frozen base's at the chain's own x_k, which depends on theta, and so does f_ref(x_k):
    reference_grad keeps that path, the exact gradient; without it (no_grad, ~1/4 cheaper per step) the gradient
    misses -beta (mean - mean_ref) J_ref dx_k/dtheta, a bias zero at the base that grows with the distance from it.
    """
    x, total_kl = latents, torch.zeros(latents.shape[0], device=latents.device)
    for step, noise in zip(schedule[:-1], noises, strict=True):  # the last step adds no noise: no policy step, no KL
        mean = step.alpha_next * unet_call(consistency_fn, checkpoint, unet, x, step, prompt_embeds, w_embedding)
        if with_kl:
            with torch.set_grad_enabled(torch.is_grad_enabled() and reference_grad):
                reference = unet_call(reference_fn, checkpoint, unet, x, step, prompt_embeds, w_embedding)
            total_kl = total_kl + gaussian_divergence("kl", mean.float(), (step.alpha_next * reference).float(),
                                                      step.sigma_next)
        x = mean + step.sigma_next * noise
    return unet_call(consistency_fn, checkpoint, unet, x, schedule[-1], prompt_embeds, w_embedding), total_kl


def rocm_loss(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """-J: the negative KL-regularized reward, averaged over the batch."""
    return (-rewards + beta * kl).mean()


class RocmObjective(torch.nn.Module):
    """The loss of one micro-batch as one forward (the chain with gradients, decode, reward, KL): wrapped whole in
    DistributedDataParallel, not the UNet, it gives DDP the one forward per backward it expects, although the chain
    calls the UNet K times, plus reference passes and recomputations."""

    def __init__(self, tokenizer, text_encoder, vae, unet, reward_fn, schedule: list[ChainStep], beta: float,
                 reference_grad: bool = True, checkpoint: bool = True, checkpoint_decode: bool = False):
        super().__init__()
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.reward_fn, self.schedule, self.beta, self.reference_grad = reward_fn, schedule, beta, reference_grad
        self.checkpoint, self.checkpoint_decode = checkpoint, checkpoint_decode

    def forward(self, prompts: list[str], latents, noises, w_embedding):
        """Returns (loss, per-sample rewards, per-sample KL)."""
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts)
        final, kl = sample_chain(self.unet, latents, noises, self.schedule, embeds, w_embedding, with_kl=True,
                                 reference_grad=self.reference_grad and self.beta > 0, checkpoint=self.checkpoint)
        kl = kl if self.beta > 0 else kl.detach()  # at beta 0 only measured (the drift from the base), no gradient
        rewards = unet_call(lambda z: self.reward_fn(decode(self.vae, z), prompts), self.checkpoint_decode, final)
        return rocm_loss(rewards.float(), kl, self.beta), rewards.float(), kl


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
    run = Run(args)  # rank and device; a --resume checkpoint is checked and its directory locked before models load
    device = run.device

    # ---- models: the LCM with a LoRA (the policy; the base is the same UNet with the LoRA off), the rewards
    tokenizer, text_encoder, vae, unet, scheduler = load_lcm(args.model, device, run.dtype)
    latent_shape = check_model(args, tokenizer, vae, unet, scheduler, train_prompts + eval_prompts, run.is_main)
    reward_fn = load_reward_spec(args.reward, device, run.dtype)
    eval_rewards = load_eval_rewards(args.eval_rewards, run.dtype) if run.is_main else {}
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, device)
    objective = RocmObjective(tokenizer, text_encoder, vae, unet, reward_fn, schedule, args.beta, args.reference_grad,
                              args.gradient_checkpointing, args.checkpoint_decode)
    w_embedding = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, args.batch_size, device)
    images_per_step = args.batch_size * args.grad_accum * run.world_size  # one reward query each
    start_step, objective = run.begin(unet, optimizer, objective, f"{args.batch_size} x {args.grad_accum} "
                                      f"accumulation x {run.world_size} ranks = {images_per_step} images")

    def evaluate_now(step: int) -> None:  # the policy's samples (its chain, no gradients) on the held-out prompts
        run.evaluate(step, lambda x, noises, embeds, w: sample_chain(unet, x, noises, schedule, embeds, w)[0],
                     (tokenizer, text_encoder, vae, unet), eval_prompts, eval_rewards, latent_shape, len(schedule))

    if start_step == 0:
        evaluate_now(0)
    for step in range(start_step + 1, args.train_steps + 1):
        unet.train()
        started = time.perf_counter()
        run.snapshot(step - 1)  # the weights before this update, kept while they are the last with a finite loss
        measured, finite = [], True  # per micro-batch: (rewards, KLs, loss)
        # ---- sample and loss: the chain with gradients, the reward of the decoded image, the KL to the base
        for micro in range(args.grad_accum):
            prompts, latents, noises = micro_batch(args.seed, train_prompts, step, micro, args.batch_size, run.rank,
                                                   run.world_size, latent_shape, len(schedule), device)
            with run.backward_pass(objective, step, last=micro == args.grad_accum - 1):
                with run.autocast:
                    loss, reward, kl = objective(prompts, latents, noises, w_embedding)
                finite &= torch.isfinite(loss).item()
                run.grad_scaler.scale(loss / args.grad_accum).backward()
            measured.append((reward.detach(), kl.detach(), loss.detach().reshape(1)))
        # ---- update: skipped on every rank together when a loss or a gradient is not finite
        grad_norm = run.update(step, finite, lora_params, args.max_grad_norm)
        step_time = time.perf_counter() - started
        # ---- log
        if grad_norm is not None and step % args.log_every == 0:
            reward_mean, kl_mean, loss_mean = (global_mean(torch.cat(v), run.world_size) for v in zip(*measured))
            run.log_step(step, {"train/reward": reward_mean, "train/kl": kl_mean, "train/divergence": kl_mean,
                                "train/loss": loss_mean, "train/grad_norm": grad_norm}, f"reward {reward_mean:.4f} "
                         f"kl {kl_mean:.4f} loss {loss_mean:.4f}", step_time, images_per_step, images_per_step)
        # ---- save and evaluate
        run.save(step)
        if args.eval_every and step % args.eval_every == 0 and step != args.train_steps:
            evaluate_now(step)
    run.finish(lora_params, lambda: evaluate_now(args.train_steps))


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE (rocm_kl only): the flags that define a run, the checks of the flags
# --------------------------------------------------------------------------------------------

# the flags --resume must find unchanged (global_batch = --batch-size x ranks fixes the samples); the rest may change
RUN_FLAGS = ("model", "reward", "resolution", "num_inference_steps", "guidance_scale", "lora_rank", "lora_alpha",
             "seed", "global_batch", "grad_accum")
OOM_FIX = ("lower --batch-size (raise --grad-accum to keep the effective batch), keep --gradient-checkpointing, add "
           "--checkpoint-decode, or lower --resolution")


def validate(args: Args) -> None:
    """Reject impossible settings with a one-line message before anything is loaded."""
    validate_shared(args, [
        (args.reward.partition("=")[0] not in DIFFERENTIABLE_REWARDS, f"reward '{args.reward}' has no gradient; ROCM "
         f"needs a differentiable reward ({', '.join(DIFFERENTIABLE_REWARDS)}) or use rlcm_ppo.py"),
    ], beta=">= 0")


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
