"""ROCM with KL regularization: reward backpropagated through the whole LCM sampling chain.

Paper: "RLHF on Consistency Models" (ROCM). A latent consistency model samples in K steps; every
step but the last is a Gaussian policy p_k(x_{k-1} | x_k, c) = N(alpha'_k f_theta(x_k), sigma'^2_k I).
The chain is reparameterized (x_{k-1} = alpha' f_theta(x_k) + sigma' z), so the reward of the final
image is differentiable in the LoRA weights through all K steps. ROCM maximizes

    E_z [ R(decode(x_0), c) - beta * sum_{k=1}^{K-1} KL(p_k(. | theta, x_k, c) || p_k(. | theta_ref, x_k, c)) ]

with the frozen base model as reference (the same UNet with LoRA adapters disabled). The KL of two
Gaussians with equal std is ||alpha'(f_theta - f_ref)||^2 / (2 sigma'^2), summed over the latent.

This file holds the whole algorithm: loading, LoRA, the K-step chain (bit-exact with diffusers'
LatentConsistencyModelPipeline), gradient checkpointing, loss, training, evaluation, logging, saving.

Run (GPU, real model):
    python rocm_kl.py --reward pickscore --beta 0.01 --train-steps 2000 --track
Run (CPU, the tiny offline world built by `python -m tests.tiny_world /tmp/tiny`):
    python rocm_kl.py --model /tmp/tiny/lcm --reward aesthetic=/tmp/tiny/aesthetic \
        --eval-rewards clipscore=/tmp/tiny/clip --resolution 32 --device cpu --mixed-precision no
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.utils.checkpoint
import tyro

from common import REWARDS, gaussian_divergence, load_reward

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


@dataclass
class Args:
    # general
    exp_name: str = Path(__file__).stem
    """name of this experiment (run directory and wandb run name)"""
    seed: int = 0
    """seed of python, numpy, torch and the sampling noise"""
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
    save_every: int = 0
    """also save the LoRA every this many optimizer steps (0: only at the end)"""

    # model
    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """hub id or local directory of a LatentConsistencyModelPipeline"""
    resolution: int = 512
    """image side in pixels (the paper trains at 512)"""
    num_inference_steps: int = 8
    """K, the number of LCM sampling steps"""
    guidance_scale: float = 8.5
    """LCM guidance scale; the UNet is conditioned on w = guidance_scale - 1 (omega 7.5 in the paper)"""
    lora_rank: int = 16
    """LoRA rank on the UNet attention projections"""
    lora_alpha: int = 32
    """LoRA alpha (scale alpha / rank)"""
    gradient_checkpointing: bool = True
    """recompute each UNet call in the backward pass instead of storing its activations"""
    checkpoint_decode: bool = False
    """also recompute the VAE decode and the reward in the backward pass (less memory at high resolution)"""

    # algorithm
    reward: str = "pickscore"
    """reward to maximize: NAME or NAME=PATH (hub id or local dir); differentiable: pickscore, hpsv2, clipscore, aesthetic"""
    eval_rewards: tuple[str, ...] = ("pickscore", "hpsv2", "clipscore", "aesthetic")
    """rewards scored on held-out prompts, NAME or NAME=PATH; ones that cannot be loaded are skipped with a warning"""
    prompts_file: Optional[str] = None
    """training prompts, one per line (default: the repo's prompts/train.txt)"""
    eval_prompts_file: Optional[str] = None
    """held-out evaluation prompts, one per line (default: the repo's prompts/eval.txt)"""
    beta: float = 0.01
    """KL weight; the paper's rule: beta * KL about one order of magnitude below the reward"""
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
    eval_batch_size: int = 8
    """images per batch during evaluation"""
    max_nonfinite_steps: int = 10
    """stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)"""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_lcm(model: str, device: torch.device, weight_dtype: torch.dtype):
    """Load tokenizer, text encoder, VAE, UNet and scheduler of an LCM pipeline, frozen, in weight_dtype."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=weight_dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=weight_dtype)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=weight_dtype)
        scheduler = LCMScheduler.from_pretrained(model, subfolder="scheduler")
    except Exception as error:  # hub and file errors come in many types; all mean the same here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: could not load the LCM pipeline from '{model}' ({reason}); "
                         "pass --model a local pipeline directory or a reachable hub id")
    if unet.config.time_cond_proj_dim is None:
        raise SystemExit(f"error: '{model}' has no guidance-conditioned UNet (time_cond_proj_dim); pass an LCM")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.to(device)
    return tokenizer, text_encoder.eval(), vae.eval(), unet, scheduler


def add_lora(unet, rank: int, alpha: int) -> list[torch.nn.Parameter]:
    """LoRA on the attention projections (B initialised to zero, so the policy starts at the base)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for param in lora_params:  # trainable weights stay fp32 under autocast
        param.data = param.data.float()
    return lora_params


def save_lora(unet, directory: Path) -> None:
    """Save the LoRA in diffusers format (LatentConsistencyModelPipeline.load_lora_weights reads it).

    Written to a temporary directory first and renamed, so an interrupted save never leaves a
    half-written checkpoint in place of a good one.
    """
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    LatentConsistencyModelPipeline.save_lora_weights(save_directory=tmp, unet_lora_layers=state,
                                                     safe_serialization=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: prompts file '{path}' does not exist; pass an existing file, one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: prompts file '{path}' has no prompts; write one prompt per line")
    return prompts


def load_reward_spec(spec: str, device: torch.device, dtype: torch.dtype):
    """'name' or 'name=path' -> a frozen reward module (see common.load_reward)."""
    name, _, path = spec.partition("=")
    if name not in REWARDS:
        raise SystemExit(f"error: unknown reward '{name}'; choose one of: {', '.join(REWARDS)}")
    return load_reward(name, path or None, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The LCM sampling chain
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def guidance_embedding(guidance_scale: float, dim: int, batch_size: int, device) -> torch.Tensor:
    """Sinusoidal embedding of w = guidance_scale - 1 (scaled by 1000), the LCM's guidance input."""
    w = torch.tensor(guidance_scale - 1).repeat(batch_size) * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding.to(device)


@dataclass
class ChainStep:
    """Coefficients of one LCM step at timestep t; *_next describe the noise added towards t'."""

    t: torch.Tensor
    alpha: torch.Tensor  # sqrt(alphas_cumprod[t])
    sigma: torch.Tensor  # sqrt(1 - alphas_cumprod[t])
    c_skip: torch.Tensor
    c_out: torch.Tensor
    alpha_next: Optional[torch.Tensor]  # None on the last, deterministic step
    sigma_next: Optional[torch.Tensor]


def lcm_schedule(scheduler, num_steps: int, device) -> list[ChainStep]:
    """The scheduler's timesteps and boundary-condition scalings, computed as LCMScheduler.step does."""
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    acp = scheduler.alphas_cumprod
    sigma_data = 0.5
    steps = []
    for i, t in enumerate(timesteps):
        scaled = t.cpu() * scheduler.config.timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        alpha_prod = acp[t.cpu()]
        step = dict(t=t, alpha=alpha_prod.sqrt(), sigma=(1 - alpha_prod).sqrt(), c_skip=c_skip, c_out=c_out,
                    alpha_next=None, sigma_next=None)
        if i + 1 < len(timesteps):
            next_prod = acp[timesteps[i + 1].cpu()]
            step.update(alpha_next=next_prod.sqrt(), sigma_next=(1 - next_prod).sqrt())
        steps.append(ChainStep(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in step.items()}))
    return steps


def consistency_fn(unet, x: torch.Tensor, step: ChainStep, prompt_embeds, w_embedding) -> torch.Tensor:
    """f(x_t): the LCM's clean-latent estimate, c_out * x0_hat + c_skip * x with x0_hat from epsilon."""
    eps = unet(x, step.t, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding).sample
    x0_hat = (x - step.sigma * eps) / step.alpha
    return step.c_out * x0_hat + step.c_skip * x


def draw_chain_noise(shape, num_steps: int, generator: torch.Generator, device) -> tuple[torch.Tensor, list]:
    """Initial latents, then one noise draw per stochastic step, in the pipeline's order."""
    latents = torch.randn(shape, generator=generator, device=generator.device).to(device)
    noises = [torch.randn(shape, generator=generator, device=generator.device).to(device) for _ in range(num_steps - 1)]
    return latents, noises


def sample_chain(unet, latents, noises, schedule: list[ChainStep], prompt_embeds, w_embedding,
                 beta: float = 0.0, checkpoint: bool = False):
    """Run the K-step chain with gradients; return (final latent x_0, per-sample sum of step KLs).

    With beta > 0 the reference's mean at every stochastic step comes from the same UNet with
    adapters disabled, at the same x_k, under no_grad. The last step adds no noise, so it is no
    policy step and contributes no divergence.
    """
    x = latents
    total_kl = torch.zeros(latents.shape[0], device=latents.device)
    for k, step in enumerate(schedule):
        if checkpoint and torch.is_grad_enabled():
            denoised = torch.utils.checkpoint.checkpoint(consistency_fn, unet, x, step, prompt_embeds,
                                                         w_embedding, use_reentrant=False)
        else:
            denoised = consistency_fn(unet, x, step, prompt_embeds, w_embedding)
        if step.alpha_next is None:
            return denoised, total_kl
        mean = step.alpha_next * denoised
        if beta > 0:
            with torch.no_grad():
                unet.disable_adapters()
                reference = consistency_fn(unet, x, step, prompt_embeds, w_embedding)
                unet.enable_adapters()
            total_kl = total_kl + gaussian_divergence("kl", mean.float(), (step.alpha_next * reference).float(),
                                                      step.sigma_next)
        x = mean + step.sigma_next * noises[k]
    raise AssertionError("the schedule has no final step")


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], as the pipeline's postprocessing does."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def rocm_loss(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative KL-regularized reward, averaged over the batch."""
    return (-rewards + beta * kl).mean()


# --------------------------------------------------------------------------------------------
# Evaluation and logging
# --------------------------------------------------------------------------------------------

def save_image_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from PIL import Image

    images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    grid = torch.zeros(3, rows * h, columns * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


@torch.no_grad()
def evaluate(args: Args, models, schedule, prompts: list[str], eval_rewards: dict, device, autocast):
    """Sample the held-out prompts with a fixed seed and score them with every evaluation reward."""
    tokenizer, text_encoder, vae, unet = models
    generator = torch.Generator(device=device).manual_seed(args.seed + 1_000_003)
    images, scores = [], {name: [] for name in eval_rewards}
    for start in range(0, len(prompts), args.eval_batch_size):
        batch = prompts[start:start + args.eval_batch_size]
        side = args.resolution // vae_scale(vae)
        shape = (len(batch), unet.config.in_channels, side, side)
        latents, noises = draw_chain_noise(shape, len(schedule), generator, device)
        with autocast:
            embeds = encode_prompts(tokenizer, text_encoder, batch)
            w_emb = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, len(batch), device)
            final, _ = sample_chain(unet, latents, noises, schedule, embeds, w_emb)
            batch_images = decode(vae, final)
        images.append(batch_images.cpu())
        for name, reward in eval_rewards.items():
            reward.to(device)
            with autocast:
                scores[name].append(reward(batch_images, batch).float().cpu())
    return torch.cat(images), {name: torch.cat(values) for name, values in scores.items()}


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def validate(args: Args) -> None:
    """Reject impossible settings with a one-line message before anything is loaded."""
    problems = [
        (args.beta < 0, f"--beta must be >= 0 (got {args.beta})"),
        (args.num_inference_steps < 1, f"--num-inference-steps must be >= 1 (got {args.num_inference_steps})"),
        (args.train_steps < 0, f"--train-steps must be >= 0 (got {args.train_steps})"),
        (args.batch_size < 1, f"--batch-size must be >= 1 (got {args.batch_size})"),
        (args.grad_accum < 1, f"--grad-accum must be >= 1 (got {args.grad_accum})"),
        (args.eval_batch_size < 1, f"--eval-batch-size must be >= 1 (got {args.eval_batch_size})"),
        (args.lr <= 0, f"--lr must be > 0 (got {args.lr})"),
        (args.lora_rank < 1, f"--lora-rank must be >= 1 (got {args.lora_rank})"),
        (args.resolution < 1, f"--resolution must be positive (got {args.resolution})"),
    ]
    for failed, message in problems:
        if failed:
            raise SystemExit(f"error: {message}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available here; pass --device cpu --mixed-precision no (slow)")


def main(args: Args) -> None:
    validate(args)
    run_dir = Path(args.output_dir) / f"{args.exp_name}__{args.seed}__{int(time.time())}"
    train_prompts = read_prompts(args.prompts_file or PROMPTS_DIR / "train.txt")
    eval_prompts = read_prompts(args.eval_prompts_file or PROMPTS_DIR / "eval.txt")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")

    try:
        reward_fn = load_reward_spec(args.reward, device, weight_dtype)
    except (FileNotFoundError, ImportError) as error:
        raise SystemExit(f"error: {error}")
    if not reward_fn.differentiable:
        raise SystemExit(f"error: reward '{args.reward}' has no gradient; ROCM needs a differentiable reward "
                         "(pickscore, hpsv2, clipscore, aesthetic) or use rlcm_ppo.py")
    eval_rewards = {}
    for spec in args.eval_rewards:
        try:  # kept on the CPU between evaluations so they cost no GPU memory during training
            eval_rewards[spec.partition("=")[0]] = load_reward_spec(spec, torch.device("cpu"), weight_dtype)
        except (FileNotFoundError, ImportError) as error:
            print(f"warning: skipping evaluation reward: {error}")

    tokenizer, text_encoder, vae, unet, scheduler = load_lcm(args.model, device, weight_dtype)
    factor = vae_scale(vae) * 2 ** (len(unet.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise SystemExit(f"error: --resolution must be a multiple of {factor} for this model (got {args.resolution})")
    lora_params = add_lora(unet, args.lora_rank, args.lora_alpha)
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    schedule = lcm_schedule(scheduler, args.num_inference_steps, device)
    models = (tokenizer, text_encoder, vae, unet)
    latent_shape = (args.batch_size, unet.config.in_channels, args.resolution // vae_scale(vae),
                    args.resolution // vae_scale(vae))
    w_embedding = guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, args.batch_size, device)
    noise_generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt_rng = random.Random(args.seed)

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=run_dir.name, config=asdict(args))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
    print(f"run directory: {run_dir}")

    def log(metrics: dict, step: int) -> None:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if args.track:
            wandb.log(metrics, step=step)

    def run_evaluation(step: int) -> None:
        unet.eval()
        images, scores = evaluate(args, models, schedule, eval_prompts, eval_rewards, device, autocast)
        for reward in eval_rewards.values():
            reward.to("cpu")
        save_image_grid(images, run_dir / "samples" / f"step_{step:06d}.png")
        metrics = {f"eval/{name}": values.mean().item() for name, values in scores.items()}
        print(f"eval step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if args.track:
            table = wandb.Table(columns=["prompt", "image", *scores])
            for i, prompt in enumerate(eval_prompts):
                table.add_data(prompt, wandb.Image(images[i].permute(1, 2, 0).numpy()),
                               *[values[i].item() for values in scores.values()])
            metrics["eval/samples"] = table
        log(metrics, step)

    def checkpoint_and_stop(message: str) -> None:
        save_lora(unet, run_dir / "last_good")
        raise SystemExit(f"error: {message}; the last good LoRA is in {run_dir / 'last_good'}")

    run_evaluation(0)
    nonfinite_in_a_row = 0
    for step in range(1, args.train_steps + 1):
        unet.train()
        start = time.perf_counter()
        rewards, kls, losses, finite = [], [], [], True
        for _ in range(args.grad_accum):
            prompts = prompt_rng.choices(train_prompts, k=args.batch_size)
            latents, noises = draw_chain_noise(latent_shape, len(schedule), noise_generator, device)
            with autocast:
                embeds = encode_prompts(tokenizer, text_encoder, prompts)
                final, kl = sample_chain(unet, latents, noises, schedule, embeds, w_embedding, args.beta,
                                         checkpoint=args.gradient_checkpointing)
                if args.checkpoint_decode:
                    reward = torch.utils.checkpoint.checkpoint(lambda z: reward_fn(decode(vae, z), prompts), final,
                                                               use_reentrant=False)
                else:
                    reward = reward_fn(decode(vae, final), prompts)
                loss = rocm_loss(reward.float(), kl, args.beta)
            if not torch.isfinite(loss):
                finite = False
                break
            grad_scaler.scale(loss / args.grad_accum).backward()
            rewards.append(reward.detach())
            kls.append(kl.detach())
            losses.append(loss.detach())
        if finite:
            grad_scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            grad_scaler.step(optimizer)
            grad_scaler.update()
            nonfinite_in_a_row = 0
        else:
            nonfinite_in_a_row += 1
            print(f"warning: step {step}: non-finite loss or gradient, update skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                optimizer.zero_grad(set_to_none=True)
                checkpoint_and_stop(f"{nonfinite_in_a_row} non-finite steps in a row at step {step}; "
                                    "lower --lr or use --mixed-precision bf16/no")
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - start

        if finite and step % args.log_every == 0:
            reward_mean, kl_mean = torch.cat(rewards).mean().item(), torch.cat(kls).mean().item()
            samples_per_s = args.batch_size * args.grad_accum / step_time
            metrics = {"train/reward": reward_mean, "train/kl": kl_mean, "train/divergence": kl_mean,
                       "train/loss": torch.stack(losses).mean().item(), "train/grad_norm": grad_norm.item(),
                       "perf/step_time_s": step_time, "perf/samples_per_s": samples_per_s}
            print(f"step {step}/{args.train_steps} reward {reward_mean:.4f} kl {kl_mean:.4f} "
                  f"loss {metrics['train/loss']:.4f} | {samples_per_s:.2f} samples/s")
            log(metrics, step)
        if args.save_every and step % args.save_every == 0:
            save_lora(unet, run_dir / f"step_{step:06d}")
        if args.eval_every and step % args.eval_every == 0 and step != args.train_steps:
            run_evaluation(step)

    if args.train_steps:
        run_evaluation(args.train_steps)
    save_lora(unet, run_dir / "final")
    print(f"saved LoRA to {run_dir / 'final'}")
    if args.track:
        wandb.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
