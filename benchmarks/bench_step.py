"""Speed and memory of each script's training step, at real model scale with random weights.

Builds the architectures of LCM_Dreamshaper_v7 (SD1.5 UNet with time_cond_proj_dim 256, SD VAE,
CLIP ViT-L text encoder) and of the reward towers (CLIP ViT-H/14 for PickScore) from configs, saves
them once under --models-dir, loads them through the scripts' own loaders and times the scripts'
own training-step code: forward (chain, decode, reward), backward and the optimizer step. For each
script and batch size it reports the median time per image over --repeats steps after --warmup,
peak GPU memory, FLOPs counted by torch's FlopCounterMode, and utilization against the bf16 matmul
rate measured in the same run. Writes a markdown table to --output.

GPU (about 10 minutes; the first call spends ~2 of them writing 10 GB of random weights):
    python benchmarks/bench_step.py --batch-sizes 1 4 8
CPU check of the harness on the tiny test world:
    python benchmarks/bench_step.py --scale tiny --device cpu --mixed-precision no --batch-sizes 1 2
"""

from __future__ import annotations

import datetime
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
           "a bowl of ramen, studio lighting", "a red fox in fresh snow"]


@dataclass
class Args:
    scale: Literal["real", "tiny"] = "real"
    """real: the architectures of the paper's models; tiny: the test world, to check the harness on a CPU"""
    scripts: tuple[str, ...] = ("rocm_kl",)
    """scripts whose training step is timed"""
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    """images per step"""
    resolution: int = 0
    """image side in pixels (0: 512 for real, 32 for tiny)"""
    num_inference_steps: int = 8
    """K, the LCM sampling steps of the chain"""
    warmup: int = 2
    """untimed steps first (allocator warm-up, compilation)"""
    repeats: int = 5
    """timed steps; the median is reported"""
    device: str = "cuda"
    """torch device"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """autocast dtype, as in the scripts"""
    models_dir: str = "benchmarks/models"
    """where the random-weight models are saved (built if missing)"""
    output: str = "benchmarks/step_speed.md"
    """markdown table written here"""


def build_models(args: Args) -> dict[str, Path]:
    from tests.tiny_world import build_tiny_world

    root = Path(args.models_dir) / args.scale
    paths = {"lcm": root / "lcm", "clip": root / "clip", "aesthetic": root / "aesthetic", "prompts": root / "prompts.txt"}
    if not all(path.exists() for path in paths.values()):
        print(f"building {args.scale} models under {root} ...")
        paths = build_tiny_world(root, size=args.scale)
    return paths


def rocm_step(script: str, args: Args, models: dict[str, Path], batch_size: int) -> Callable[[], torch.Tensor]:
    """One optimizer step of rocm_kl.py (or a script with its layout), built with the script's own functions."""
    module = __import__(script)
    run_args = module.Args(model=str(models["lcm"]), reward=f"pickscore={models['clip']}", batch_size=batch_size,
                           resolution=args.resolution, num_inference_steps=args.num_inference_steps,
                           device=args.device, mixed_precision=args.mixed_precision)
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision != "no")
    tokenizer, text_encoder, vae, unet, scheduler = module.load_lcm(run_args.model, device, dtype)
    lora_params = module.add_lora(unet, run_args.lora_rank, run_args.lora_alpha)
    reward_fn = module.load_reward_spec(run_args.reward, device, dtype)
    schedule = module.lcm_schedule(scheduler, run_args.num_inference_steps, device)
    objective = module.RocmObjective(run_args, tokenizer, text_encoder, vae, unet, reward_fn, schedule)
    optimizer = torch.optim.AdamW(lora_params, lr=run_args.lr)
    side = run_args.resolution // module.vae_scale(vae)
    w_embedding = module.guidance_embedding(run_args.guidance_scale, unet.config.time_cond_proj_dim, batch_size, device)
    steps = itertools.count(1)

    def step() -> torch.Tensor:
        prompts, latents, noises = module.micro_batch(run_args, PROMPTS, next(steps), 0, 0, 1,
                                                      (unet.config.in_channels, side, side), len(schedule), device)
        with autocast:
            loss, _, _ = objective(prompts, latents, noises, w_embedding)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


STEPS = {"rocm_kl": rocm_step}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> float:
    """Seconds one call takes (CUDA events on a GPU, so host overhead hidden by async launches is not counted twice)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the training dtype: the ceiling utilization is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(10))
    return 2 * n**3 / seconds


def measure(step: Callable[[], torch.Tensor], args: Args, batch_size: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = statistics.median(timed(step, device) for _ in range(args.repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return {"s_per_image": seconds / batch_size, "flop_per_image": counter.get_total_flops() / batch_size,
            "peak_gib": peak}


def main(args: Args) -> None:
    if args.resolution == 0:
        args.resolution = 512 if args.scale == "real" else 32
    unknown = [script for script in args.scripts if script not in STEPS]
    if unknown:
        raise SystemExit(f"error: no benchmark for {', '.join(unknown)}; choose from: {', '.join(STEPS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available here; pass --scale tiny --device cpu --mixed-precision no")
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    models = build_models(args)
    rate = matmul_rate(device, dtype)
    print(f"matmul rate ({dtype}): {rate / 1e12:.1f} TFLOP/s")

    import diffusers

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Training step per image, {args.scale} scale, {args.resolution} px, K={args.num_inference_steps}, "
             f"LoRA r16, {args.mixed_precision}, checkpointing on. {hardware}, torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}, {datetime.date.today()}; matmul rate measured in the same run: "
             f"{rate / 1e12:.1f} TFLOP/s.", "",
             "| script | batch | ms / image | GFLOP / image | TFLOP/s | % of matmul rate | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for script in args.scripts:
        for batch_size in args.batch_sizes:
            figures = measure(STEPS[script](script, args, models, batch_size), args, batch_size)
            achieved = figures["flop_per_image"] / figures["s_per_image"]
            row = (f"| {script} | {batch_size} | {figures['s_per_image'] * 1e3:.1f} | "
                   f"{figures['flop_per_image'] / 1e9:.1f} | {achieved / 1e12:.2f} | {100 * achieved / rate:.1f} | "
                   f"{figures['peak_gib']:.1f} |")
            print(row)
            lines.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
