"""Score a saved LoRA (or the base model) on a prompt set with every available reward and metric.

Samples --samples-per-prompt images per prompt with the LCM chain of rocm_kl.py (same seeds for
every LoRA, so runs are compared on identical noise), scores them with each reward of
--eval-rewards that loads, and, with --digits, with the digits world's evaluation-only judges
(held-out classifier accuracy for the prompted digit, Frechet distance to real held-out digits).
Writes JSON, a markdown table and an image grid, by default beside the evaluated run (RUN_DIR/eval/).
A LoRA saved by a script carries its run's flags (args.json): its model, rewards, prompts and sampling
settings are the defaults here, so `--lora DIR` alone evaluates it as it was trained.

    python benchmarks/evaluate.py --lora runs/rocm_kl__0__1700000000/final   # every script prints this line
    python benchmarks/evaluate.py --model world/digits/lcm --digits --device cpu --mixed-precision no \
        --eval-rewards clipscore=world/digits/clip aesthetic=world/digits/aesthetic \
        --eval-prompts-file world/digits/prompts_eval.txt --resolution 32 --num-inference-steps 4
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rocm_kl  # noqa: E402  (the sampling chain and loaders every script shares)
from common import REWARDS  # noqa: E402


@dataclass
class Args:
    model: str = "SimianLuo/LCM_Dreamshaper_v7"
    """hub id or local directory of an SD1.5 or SDXL pipeline: an LCM, or a base with --unet or --lcm-lora"""
    unet: Optional[str] = None
    """hub id or directory of a UNet-only LCM that replaces the pipeline's (e.g. latent-consistency/lcm-sdxl)"""
    lcm_lora: Optional[str] = None
    """hub id or directory of an LCM-LoRA, fused into the base first (e.g. latent-consistency/lcm-lora-sdv1-5)"""
    lora: Optional[str] = None
    """a LoRA directory saved by any script (run_dir/final or a checkpoint); none scores the base model"""
    eval_rewards: tuple[str, ...] = ("pickscore", "hpsv2", "clipscore", "aesthetic", "imagereward")
    """rewards to score with, NAME or NAME=PATH; ones that cannot be loaded are skipped with a warning"""
    eval_prompts_file: Optional[str] = None
    """prompts, one per line (default: the repo's prompts/eval.txt)"""
    digits: bool = False
    """also score the digits world's evaluation-only metrics (digit accuracy, Frechet distance)"""
    samples_per_prompt: int = 4
    """images per prompt"""
    resolution: int = 512
    """image side in pixels"""
    num_inference_steps: int = 8
    """LCM sampling steps"""
    guidance_scale: float = 8.5
    """LCM guidance scale"""
    seed: int = 0
    """seed of the sampling noise (the same for every LoRA)"""
    eval_batch_size: int = 8
    """images per sampling batch"""
    device: str = "cuda"
    """torch device"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """autocast dtype"""
    output: Optional[str] = None
    """JSON written here, the markdown table and the image grid beside it (.md, .png); unset: the LoRA's run
    directory, eval/NAME.json (NAME: final or the checkpoint's), or eval/base.json without a LoRA"""


def load_models(args: Args, device: torch.device, dtype: torch.dtype):
    encode, vae, unet, scheduler, latent_shape = rocm_kl.load_lcm(args, device, dtype)
    if args.lora:
        if not (Path(args.lora) / "pytorch_lora_weights.safetensors").is_file():
            raise SystemExit(f"error: no LoRA in '{args.lora}'; pass a directory holding pytorch_lora_weights.safetensors")
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # the pipeline's import and load_lora_weights warn about parts this LoRA does not have (torchvision for
        # SigLIP's image processor, text-encoder LoRA keys): noise beside the scores
        transformers_logging.set_verbosity_error()
        diffusers_logging.set_verbosity_error()
        from diffusers.loaders import StableDiffusionLoraLoaderMixin as loader

        # the two halves of a pipeline's load_lora_weights, exactly how a user of the saved LoRA loads it
        state, alphas, metadata = loader.lora_state_dict(args.lora, return_lora_metadata=True)
        loader.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    return encode, vae, unet, scheduler, latent_shape


@torch.no_grad()
def sample(args: Args, models, prompts: list[str], device, autocast) -> torch.Tensor:
    encode, vae, unet, scheduler, latent_shape = models
    schedule = rocm_kl.lcm_schedule(scheduler, args.num_inference_steps, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = []
    for start in range(0, len(prompts), args.eval_batch_size):
        batch = prompts[start:start + args.eval_batch_size]
        latents, noises = rocm_kl.draw_chain_noise((len(batch), *latent_shape), len(schedule), generator, device)
        with autocast:
            embeds = encode(batch)
            w_embedding = rocm_kl.guidance_embedding(args.guidance_scale, unet.config.time_cond_proj_dim, len(batch),
                                                     device)
            final, _ = rocm_kl.sample_chain(unet, latents, noises, schedule, embeds, w_embedding)
            images.append(rocm_kl.decode(vae, final).float().cpu())
    return torch.cat(images)


@torch.no_grad()
def score(args: Args, images: torch.Tensor, prompts: list[str], device, dtype, autocast) -> dict[str, float]:
    results = {}
    for spec in args.eval_rewards:
        name = spec.partition("=")[0]
        try:
            reward = rocm_kl.load_reward_spec(spec, device, dtype)
        except SystemExit as error:  # a missing package or missing weights skip the reward
            print(f"warning: skipping {name}: {str(error).removeprefix('error: ')}")
            continue
        values = []
        for start in range(0, len(prompts), args.eval_batch_size):
            with autocast:
                values.append(reward(images[start:start + args.eval_batch_size].to(device),
                                     prompts[start:start + args.eval_batch_size]).float().cpu())
        results[name] = torch.cat(values).mean().item()
        del reward
    if args.digits:
        from world.digits_metrics import digit_accuracy, frechet_distance, real_digits

        results["digit_accuracy"] = digit_accuracy(images, prompts)
        results["frechet_distance"] = frechet_distance(images, real_digits("eval")[0])
    return results


def markdown_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """One row per evaluated model, one column per metric."""
    metrics = list(dict.fromkeys(metric for _, results in rows for metric in results))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for label, results in rows:
        cells = [f"{results[m]:.4f}" if m in results else "" for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cli() -> Args:
    """The flags; a --lora saved by a script supplies its run's flags (args.json) as the defaults."""
    argv = sys.argv[1:]
    lora = [value for flag, value in zip(argv, argv[1:]) if flag == "--lora"]
    saved = [Path(path, "args.json") for path in lora[-1:] if Path(path, "args.json").is_file()]
    default = Args()
    for path in saved:
        flags = json.loads(path.read_text())
        known = {name: flags[name] for name in asdict(default) if name in flags and name != "seed"}
        default = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})
    return tyro.cli(Args, default=default)


def main(args: Args) -> dict[str, float]:
    unknown = [spec for spec in args.eval_rewards if spec.partition("=")[0] not in REWARDS]
    if unknown:
        raise SystemExit(f"error: unknown reward '{unknown[0]}'; choose one of: {', '.join(REWARDS)}")
    if args.samples_per_prompt < 1:
        raise SystemExit(f"error: --samples-per-prompt must be >= 1 (got {args.samples_per_prompt})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available here; pass --device cpu --mixed-precision no (slow)")
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision != "no")
    prompts = rocm_kl.read_prompts(args.eval_prompts_file or rocm_kl.PROMPTS_DIR / "eval.txt", "--eval-prompts-file")
    prompts = [prompt for prompt in prompts for _ in range(args.samples_per_prompt)]

    models = load_models(args, device, dtype)
    images = sample(args, models, prompts, device, autocast)
    results = score(args, images, prompts, device, dtype, autocast)

    output = Path(args.output or "eval/base.json")
    if args.lora and not args.output:
        output = Path(args.lora).resolve().parent / "eval" / f"{Path(args.lora).resolve().name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": asdict(args), "results": results}, indent=2))
    output.with_suffix(".md").write_text(markdown_table([(args.lora or "base", results)]))
    rocm_kl.save_image_grid(images, output.with_suffix(".png"), columns=args.samples_per_prompt)  # a row per prompt
    print(" ".join(f"{name}={value:.4f}" for name, value in results.items()))
    print(f"wrote {output}, {output.with_suffix('.md')}, {output.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main(cli())
