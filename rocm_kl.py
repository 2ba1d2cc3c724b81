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
    beta: float = 1e-4
    """KL weight (the paper's scale); its rule: beta * KL about one order of magnitude below the reward"""
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
    """hub id or local directory of an SD1.5 or SDXL pipeline: an LCM, or a base with --unet or --lcm-lora"""
    unet: Optional[str] = None
    """hub id or directory of a UNet-only LCM that replaces the pipeline's (e.g. latent-consistency/lcm-sdxl)"""
    lcm_lora: Optional[str] = None
    """hub id or directory of an LCM-LoRA, fused into the base first (e.g. latent-consistency/lcm-lora-sdv1-5)"""
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
# ALGORITHM: ROCM's objective, the KL-regularized reward of the chain
# --------------------------------------------------------------------------------------------

def sample_chain(unet, latents, noises, schedule: list[ChainStep], embeds, w_embedding, with_kl: bool = False,
                 reference_grad: bool = True, gradient_checkpointing: bool = False):
    """Run the K-step chain with gradients; return (final latent x_0, per-sample sum of step KLs, 0 without with_kl).

    The reference's mean is the frozen base's at the chain's own x_k, which depends on theta, and so does f_ref(x_k):
    reference_grad keeps that path, the exact gradient; without it (no_grad, ~1/4 cheaper per step) the gradient
    misses -beta (mean - mean_ref) J_ref dx_k/dtheta, a bias zero at the base that grows with the distance from it."""
    x = latents
    total_kl = torch.zeros(latents.shape[0], device=latents.device)
    for step, noise in zip(schedule[:-1], noises, strict=True):  # the last step adds no noise: no policy step, no KL
        mean = step.alpha_next * unet_call(consistency_fn, gradient_checkpointing, unet, x, step, embeds, w_embedding)
        if with_kl:
            with torch.set_grad_enabled(torch.is_grad_enabled() and reference_grad):
                reference = unet_call(reference_fn, gradient_checkpointing, unet, x, step, embeds, w_embedding)
            total_kl += gaussian_divergence("kl", mean.float(), (step.alpha_next * reference).float(), step.sigma_next)
        x = mean + step.sigma_next * noise
    return unet_call(consistency_fn, gradient_checkpointing, unet, x, schedule[-1], embeds, w_embedding), total_kl


def rocm_loss(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """-J: the negative KL-regularized reward, averaged over the batch; at beta 0 the KL is only measured, left out."""
    return (-rewards).mean() if beta == 0 else (-rewards + beta * kl).mean()


class RocmObjective(torch.nn.Module):
    """The loss of one micro-batch as one forward (chain with gradients, decode, reward, KL): DDP wraps it whole, not
    the UNet, for the one forward per backward it expects, though the chain calls the UNet many times."""

    def __init__(self, models: tuple, reward_fn, schedule: list[ChainStep], beta: float, reference_grad: bool = True,
                 gradient_checkpointing: bool = True, checkpoint_decode: bool = False):
        super().__init__()
        self.encode, self.vae, self.unet = models  # load_lcm's, without the scheduler
        self.reward_fn = reward_fn
        self.schedule = schedule
        self.beta = beta
        self.reference_grad = reference_grad and beta > 0  # at beta 0 the KL is only measured: no gradient
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_decode = checkpoint_decode

    def forward(self, prompts: list[str], latents, noises, w_embedding):
        """Returns (loss, per-sample rewards, per-sample KL)."""
        embeds = self.encode(prompts)
        final, kl = sample_chain(self.unet, latents, noises, self.schedule, embeds, w_embedding, with_kl=True,
                                 reference_grad=self.reference_grad, gradient_checkpointing=self.gradient_checkpointing)
        rewards = unet_call(lambda z: self.reward_fn(decode(self.vae, z), prompts), self.checkpoint_decode, final)
        return rocm_loss(rewards.float(), kl, self.beta), rewards.float(), kl


def micro_batch(seed: int, prompts: list[str], step: int, micro: int, batch_size: int, rank: int, world_size: int,
                latent_shape: tuple, num_steps: int, device):
    """This rank's slice of the global micro-batch: its prompts, initial latents and chain noise. Each sample's noise
    depends only on its global index, so N ranks with batch b see exactly the samples of one process with batch N*b."""
    chosen = random.Random(derived_seed(seed, step, micro)).choices(prompts, k=batch_size * world_size)
    mine = range(rank * batch_size, (rank + 1) * batch_size)
    generators = [torch.Generator(device=device).manual_seed(derived_seed(seed, step, micro, i)) for i in mine]
    draws = [draw_chain_noise((1, *latent_shape), num_steps, generator, device) for generator in generators]
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
    run = Run(args)  # rank, device, run directory; a --resume checkpoint is read and checked before models load
    device = run.device

    # ---- models: the LCM with a LoRA (the policy; the base is the same UNet with the LoRA off), the rewards
    encode, vae, unet, scheduler, latent_shape = load_lcm(args, device, run.dtype)
    reward_fn = load_reward_spec(args.reward, device, run.dtype)
    eval_rewards = load_eval_rewards(args.eval_rewards, run.dtype) if run.is_main else {}
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, device)
    objective = RocmObjective((encode, vae, unet), reward_fn, schedule, args.beta, args.reference_grad,
                              args.gradient_checkpointing, args.checkpoint_decode)
    w_embedding = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, args.batch_size, device)
    images_per_step = args.batch_size * args.grad_accum * run.world_size  # one reward query each
    start_step, objective = run.begin(unet, optimizer, objective, f"{args.batch_size} x {args.grad_accum} "
                                      f"accumulation x {run.world_size} ranks = {images_per_step} images")

    def evaluate_now(step: int) -> None:  # the policy's samples (its chain, no gradients) on the held-out prompts
        run.evaluate(step, lambda x, noises, embeds, w: sample_chain(unet, x, noises, schedule, embeds, w)[0],
                     (encode, vae, unet), eval_prompts, eval_rewards, latent_shape, len(schedule))

    if start_step == 0:
        evaluate_now(0)
    for step in range(start_step + 1, args.train_steps + 1):
        unet.train()
        started = time.perf_counter()
        measured = []  # per micro-batch: (rewards, KLs, loss)
        # ---- sample and loss: the chain with gradients, the reward of the decoded image, the KL to the base
        for micro in range(args.grad_accum):
            prompts, latents, noises = micro_batch(args.seed, train_prompts, step, micro, args.batch_size, run.rank,
                                                   run.world_size, latent_shape, len(schedule), device)
            with run.backward_pass(objective, step, last=micro == args.grad_accum - 1):
                with run.autocast:
                    loss, reward, kl = objective(prompts, latents, noises, w_embedding)
                run.grad_scaler.scale(loss / args.grad_accum).backward()
            measured.append((reward.detach(), kl.detach(), loss.detach().reshape(1)))
        rewards, kls, losses = (torch.cat(values) for values in zip(*measured))
        # ---- update: skipped on every rank together when a loss or a gradient is not finite
        grad_norm = run.update(step, torch.isfinite(losses).all().item(), lora_params, args.max_grad_norm)
        step_time = time.perf_counter() - started
        if grad_norm is not None and step % args.log_every == 0:
            reward_mean, kl_mean, loss_mean = (global_mean(values, run.world_size) for values in (rewards, kls, losses))
            run.log_step(step, {"train/reward": reward_mean, "train/kl": kl_mean, "train/divergence": kl_mean,
                                "train/loss": loss_mean, "train/grad_norm": grad_norm}, f"reward {reward_mean:.4f} "
                         f"kl {kl_mean:.4f} loss {loss_mean:.4f}", step_time, images_per_step, images_per_step)
        run.save(step)
        if args.eval_every and step % args.eval_every == 0 and step != args.train_steps:
            evaluate_now(step)
    run.finish(lora_params, lambda: evaluate_now(args.train_steps))


# --------------------------------------------------------------------------------------------
# INFRASTRUCTURE (rocm_kl only): the flags that define a run, the checks of the flags
# --------------------------------------------------------------------------------------------

# the flags --resume must find unchanged (global_batch = --batch-size x ranks fixes the samples); the rest may change
RUN_FLAGS = ("model", "unet", "lcm_lora", "reward", "resolution", "num_inference_steps", "guidance_scale",
             "lora_rank", "lora_alpha", "seed", "global_batch", "grad_accum")
OOM_FIX = ("lower --batch-size (raise --grad-accum to keep the effective batch), keep --gradient-checkpointing, add "
           "--checkpoint-decode, or lower --resolution")


def validate(args: Args) -> None:
    """Reject impossible settings with a one-line message before anything is loaded."""
    validate_shared(args, [
        (args.reward.partition("=")[0] not in DIFFERENTIABLE_REWARDS, f"reward '{args.reward}' has no gradient; ROCM "
         f"needs a differentiable reward ({', '.join(DIFFERENTIABLE_REWARDS)}) or use rlcm_ppo.py"),
        (args.grad_accum < 1, f"--grad-accum must be >= 1 (got {args.grad_accum})"),
        (args.beta < 0, f"--beta must be >= 0 (got {args.beta})"),
        (args.num_inference_steps == 1 and args.beta > 0, "--num-inference-steps 1 has no stochastic step, so the KL "
         "is 0 and --beta has no effect; use --num-inference-steps >= 2 or --beta 0"),
    ])


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
