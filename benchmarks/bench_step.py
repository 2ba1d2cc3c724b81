"""Speed and memory of each script's training step, at real model scale with random weights.

Builds the architectures of the --base and of the reward tower (CLIP ViT-H/14 for PickScore) from
configs (tests/tiny_world.py), saves them once under --models-dir, loads them through the scripts' own
loaders (their --model, --unet, --lcm-lora flags) and times the scripts' own training-step code:
forward (chain, decode, reward), backward and the optimizer step. Bases: lcm, LCM_Dreamshaper_v7
(SD1.5 UNet with time_cond_proj_dim 256, SD VAE, CLIP ViT-L text encoder); sd_lcm_lora, an SD1.5
base with a random rank-64 LCM-LoRA fused in; sdxl_lcm_unet, the SDXL 1.0 base (CLIP ViT-L and
OpenCLIP bigG text encoders, SDXL VAE) with latent-consistency/lcm-sdxl's w-conditioned UNet;
sdxl_lcm_lora, SDXL with an LCM-LoRA fused in. The guidance scale defaults to the base's: 8.5 for the
w-conditioned UNets, 2.0 for the LCM-LoRA bases (classifier-free: two UNet passes a step); the
resolution to 512 px, 1024 px on the SDXL bases. For each script and batch size it reports the
median time per image over --repeats steps after --warmup, peak GPU memory, FLOPs counted by torch's
FlopCounterMode, and utilization against the bf16 matmul rate measured in the same run. Writes a
markdown table to --output, a row per script and batch size, the base in its first column.

Scripts: rocm_kl; rocm_fdiv, one row per --divergences entry; rlcm_ppo, one iteration (sampling its
--sample-batches batches without gradients, then one PPO epoch), per sampled image; cm_dpo, one
online-pairs step, per generated image. --fast times each step with regional torch.compile and
channels_last (speed_up below; the scripts train the eager path until a GPU shows these faster) instead, after checking on the same inputs that its loss and LoRA gradients match the
eager path's, and times the eager rocm_kl step as the reference of the speed column.

GPU (the first call of a base spends minutes writing its random weights in fp32: 4 GB for lcm and for
sd_lcm_lora, 24 GB for sdxl_lcm_unet, 14 GB for sdxl_lcm_lora (13.5 GB of them the SDXL base, shared
with sdxl_lcm_unet), and once the 4 GB reward tower):
    python benchmarks/bench_step.py --batch-sizes 1 4 8
    python benchmarks/bench_step.py --scripts rocm_kl rocm_fdiv rlcm_ppo cm_dpo --batch-sizes 1 4 8 --fast
    python benchmarks/bench_step.py --base sd_lcm_lora --batch-sizes 1 4 8
    python benchmarks/bench_step.py --base sdxl_lcm_unet --batch-sizes 1 2
    python benchmarks/bench_step.py --base sdxl_lcm_lora --batch-sizes 1 2
CPU check of the harness on the tiny test world (any --base):
    python benchmarks/bench_step.py --scale tiny --device cpu --mixed-precision no --batch-sizes 1 2
"""

from __future__ import annotations

import datetime
import functools
import gc
import itertools
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
           "a bowl of ramen, studio lighting", "a red fox in fresh snow"]
# --base -> (the scripts' model flags, as the names of the models built for them; the default guidance scale)
BASES = {"lcm": ({"model": "lcm"}, 8.5),
         "sd_lcm_lora": ({"model": "sd_base", "lcm_lora": "lcm_lora_sd"}, 2.0),
         "sdxl_lcm_unet": ({"model": "sdxl_base", "unet": "lcm_sdxl_unet"}, 8.5),
         "sdxl_lcm_lora": ({"model": "sdxl_base", "lcm_lora": "lcm_lora_sdxl"}, 2.0)}
# the fast path's largest relative gap to the eager path that still passes: float rounding only
PARITY_TOLERANCE = {"no": 1e-3, "bf16": 5e-2, "fp16": 5e-2}


@dataclass
class Args:
    scale: Literal["real", "tiny"] = "real"
    """real: the architectures of the paper's models; tiny: the test world, to check the harness on a CPU"""
    base: Literal["lcm", "sd_lcm_lora", "sdxl_lcm_unet", "sdxl_lcm_lora"] = "lcm"
    """lcm: an SD1.5 LCM pipeline (LCM_Dreamshaper_v7); sd_lcm_lora, sdxl_lcm_lora: an SD1.5 or SDXL base with an
    LCM-LoRA fused in; sdxl_lcm_unet: the SDXL base with the UNet-only LCM of latent-consistency/lcm-sdxl"""
    guidance_scale: float = 0
    """the scripts' --guidance-scale (0: the base's, 8.5 for lcm and sdxl_lcm_unet, 2.0 for the LCM-LoRA bases)"""
    scripts: tuple[str, ...] = ("rocm_kl",)
    """scripts whose training step is timed: rocm_kl, rocm_fdiv, rlcm_ppo, cm_dpo"""
    divergences: tuple[str, ...] = ("kl", "reverse_kl", "hellinger", "js", "fisher", "none")
    """rocm_fdiv: one row per divergence (per_dim reduction, the script's default)"""
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    """the scripts' --batch-size: images per step (rlcm_ppo: per sampling batch; cm_dpo: pairs)"""
    fast: bool = False
    """time every step compiled and channels_last (speed_up), after checking its loss and LoRA gradients against the eager path; the eager rocm_kl step is timed too, as the reference"""
    compile_backend: str = "inductor"
    """torch.compile backend of --fast (inductor on a GPU; aot_eager or eager check the harness on a CPU, where inductor's gradients are wrong)"""
    resolution: int = 0
    """image side in pixels (0: 512 for real, 1024 for real SDXL bases, 32 for tiny)"""
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
    """Paths of --base's models and the reward tower (clip) at --scale, by name, under --models-dir/SCALE; built where
    missing, in a scratch folder moved into place when complete (an interrupted build is redone, not half-loaded)."""
    from tests.tiny_world import build_bases, build_clip_reward, build_pipeline

    root = Path(args.models_dir) / args.scale
    flags = BASES[args.base][0]
    names = ["clip", *flags.values()]
    missing = [name for name in names if not (root / name).exists()]
    if missing:
        print(f"building the {args.scale} models {', '.join(missing)} under {root} ...")
        scratch = root / "partial"
        shutil.rmtree(scratch, ignore_errors=True)
        if "clip" in missing:
            build_clip_reward(scratch / "clip", size=args.scale)  # the seed of tests.tiny_world's clip/
        if "lcm" in missing:
            build_pipeline(scratch / "lcm", size=args.scale)
        bases = tuple(name for name in missing if name not in ("clip", "lcm"))
        if bases:
            build_bases(scratch, size=args.scale, names=bases)
        for name in missing:
            (scratch / name).rename(root / name)
        shutil.rmtree(scratch)
    return {name: root / name for name in names}


def weight_dtype(args: Args) -> torch.dtype:
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]


class Bench:
    """A script's models (--base's, models: their paths by name, as build_models returns them), LoRA and optimizer,
    loaded with the script's own functions, as its main() does.

    The LoRA's B matrices get small random values (they start at zero), so the policy differs from
    the reference and every LoRA weight has a gradient for the fast path's check. Builders set
    loss_and_grads(index): forward and backward of the step with that index, no update; and, where
    a step is more than one update (PPO), iteration(index).
    """

    def __init__(self, script: str, args: Args, models: dict[str, Path], batch_size: int, **fields):
        self.module = module = __import__(script)
        flags, guidance_scale = BASES[args.base]
        self.run_args = run_args = module.Args(
            **{flag: str(models[name]) for flag, name in flags.items()}, reward=f"pickscore={models['clip']}",
            guidance_scale=args.guidance_scale or guidance_scale, batch_size=batch_size, resolution=args.resolution,
            num_inference_steps=args.num_inference_steps, device=args.device, mixed_precision=args.mixed_precision,
            **fields)
        self.device = device = torch.device(args.device)
        dtype = weight_dtype(args)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision != "no")
        self.encode, self.vae, self.unet, self.scheduler, self.latent_shape = module.load_lcm(run_args, device, dtype)
        torch.manual_seed(run_args.seed)
        self.lora_params = module.add_lora(self.unet, run_args.lora_rank, run_args.lora_alpha)
        generator = torch.Generator().manual_seed(run_args.seed)
        with torch.no_grad():
            for name, param in self.unet.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 1e-2)
        self.reward_fn = module.load_reward_spec(run_args.reward, device, dtype)
        self.schedule = module.lcm_schedule(self.scheduler, run_args.num_inference_steps, device)
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=run_args.lr, weight_decay=run_args.weight_decay,
                                           fused=device.type == "cuda")
        self.images = batch_size
        self.iteration: Optional[Callable[[int], None]] = None
        self.steps = itertools.count(1)

    def loss_and_grads(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> None:
        """One timed training step (PPO: one iteration)."""
        index = next(self.steps)
        if self.iteration is not None:
            return self.iteration(index)
        self.loss_and_grads(index)
        self.update()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def parity_values(self, index: int = 0) -> list[torch.Tensor]:
        """The loss and the LoRA gradients of step `index` (no update), for comparing two paths."""
        loss = self.loss_and_grads(index)
        values = [loss.float().reshape(1)] + [p.grad.detach().float().clone() for p in self.lora_params]
        self.optimizer.zero_grad(set_to_none=True)
        return values


class RocmBench(Bench):
    """rocm_kl.py / rocm_fdiv.py: one micro-batch through RocmObjective (chain, decode, reward, divergence)."""

    def __init__(self, script: str, args: Args, models: dict[str, Path], batch_size: int, divergence: str = ""):
        super().__init__(script, args, models, batch_size, **({"divergence": divergence} if divergence else {}))
        m, a = self.module, self.run_args
        models = ((self.encode, self.vae, self.unet), self.reward_fn, self.schedule)
        # plain arguments, as the scripts' main() passes them; rocm_fdiv adds its divergence's knobs
        fdiv = dict(divergence=a.divergence, reduction=a.reduction, js_estimator=a.js_estimator) \
            if script == "rocm_fdiv" else {}
        self.objective = m.RocmObjective(*models, beta=a.beta, reference_grad=a.reference_grad,
                                         gradient_checkpointing=a.gradient_checkpointing,
                                         checkpoint_decode=a.checkpoint_decode,
                                         **fdiv)
        self.w_embedding = m.guidance_embedding(a.guidance_scale, self.unet.config.time_cond_proj_dim, batch_size,
                                                self.device)
        self.unet.train()

    def loss_and_grads(self, index: int) -> torch.Tensor:
        a = self.run_args
        prompts, latents, noises = self.module.micro_batch(a.seed, PROMPTS, index, 0, a.batch_size, 0, 1,
                                                           self.latent_shape, len(self.schedule), self.device)
        # rocm_fdiv's sampled JS estimate draws from generators of its own, which its objective takes last
        generators = [self.module.js_generators(a.seed, index, 0, a.batch_size, 0, self.device)] \
            if getattr(a, "divergence", "") == "js" and a.js_estimator == "sampled" else []
        with self.autocast:
            loss = self.objective(prompts, latents, noises, self.w_embedding, *generators)[0]
        loss.backward()
        return loss.detach()


class PpoBench(Bench):
    """rlcm_ppo.py: one iteration samples --sample-batches batches without gradients, scores them, and runs
    one PPO epoch over their (sample, step) pairs, an optimizer step every --grad-accum minibatches."""

    def __init__(self, script: str, args: Args, models: dict[str, Path], batch_size: int):
        super().__init__(script, args, models, batch_size)
        m, a = self.module, self.run_args
        self.unet.eval()  # as the script: sampling and training policy are the same function
        self.objective = m.PpoObjective(self.unet, self.scheduler, self.schedule, a.clip_range, a.logprob_reduction,
                                        a.gradient_checkpointing)
        dim = self.unet.config.time_cond_proj_dim
        self.sample_w = m.guidance_embedding(a.guidance_scale, dim, a.batch_size, self.device)
        self.train_w = m.guidance_embedding(a.guidance_scale, dim, a.train_batch_size, self.device)
        self.images = batch_size * a.sample_batches
        self.iteration = self.ppo_iteration

    def rollout(self, index: int):
        m, a = self.module, self.run_args
        rollouts = []
        for batch_index in range(a.sample_batches):
            prompts, latents, noises = m.micro_batch(a.seed, PROMPTS, index, batch_index, a.batch_size, 0, 1,
                                                     self.latent_shape, len(self.schedule), self.device)
            with torch.no_grad(), self.autocast:
                embeds = self.encode(prompts)
                rollout = m.sample_with_logprobs(self.unet, self.scheduler, latents, noises, self.schedule, embeds,
                                                 self.sample_w, prompts, a.logprob_reduction)
                rollout.rewards = self.reward_fn(m.decode(self.vae, rollout.final_latents), prompts).float()
            rollouts.append(rollout)
        rollout = m.Rollout.cat(rollouts)
        rollout.advantages = m.compute_advantages(rollout.rewards, rollout.prompts, None, a.adv_clip)
        shuffle = torch.Generator().manual_seed(m.derived_seed(a.seed, index, 0, 0))
        return rollout, m.ppo_minibatches(len(rollout.prompts), len(self.schedule) - 1, a.train_batch_size, shuffle)

    def backward(self, rollout, samples, steps, scale: float) -> torch.Tensor:
        with self.autocast:
            loss, _ = self.objective(rollout, samples.to(self.device), steps.to(self.device), self.train_w)
        (loss * scale).backward()
        return loss.detach()

    def loss_and_grads(self, index: int) -> torch.Tensor:
        """The iteration's sampling and its first minibatch (the importance ratio is 1 there)."""
        rollout, minibatches = self.rollout(index)
        return self.backward(rollout, *minibatches[0], 1.0)

    def ppo_iteration(self, index: int) -> None:
        rollout, minibatches = self.rollout(index)
        accum = self.run_args.grad_accum
        for start in range(0, len(minibatches), accum):
            group = minibatches[start:start + accum]
            for samples, steps in group:
                self.backward(rollout, samples, steps, 1 / len(group))
            self.update()


class DpoBench(Bench):
    """cm_dpo.py, online pairs: sample --samples-per-prompt chains per prompt without gradients, rank them by
    the reward, then one forward and backward of CmDpoObjective on the best-worst pairs."""

    def __init__(self, script: str, args: Args, models: dict[str, Path], batch_size: int):
        super().__init__(script, args, models, batch_size)
        m, a = self.module, self.run_args
        self.unet.train()
        self.objective = m.CmDpoObjective(self.unet, self.scheduler, self.schedule, None, beta=a.beta,
                                          eps=a.eps, dpo_form=a.dpo_form, last_step=a.last_step,
                                          con_weight=a.con_weight, con_target=a.con_target, con_loss=a.con_loss,
                                          gradient_checkpointing=a.gradient_checkpointing)
        self.w_row = m.guidance_embedding(a.guidance_scale, self.unet.config.time_cond_proj_dim, 1, self.device)
        models = (self.encode, self.vae, self.unet)
        self.setup = m.PairSetup(models=models, schedule=self.schedule, latent_shape=self.latent_shape,
                                 w_row=self.w_row, grid_size=len(self.objective.grid), seed=a.seed,
                                 batch_size=a.batch_size, device=self.device, autocast=self.autocast)
        self.pairs = m.OnlinePairs(PROMPTS, self.reward_fn, a.samples_per_prompt, a.reward_margin)
        self.images = batch_size * a.samples_per_prompt

    def loss_and_grads(self, index: int) -> torch.Tensor:
        batch = self.pairs.batch(self.setup, index, 0)
        with self.autocast:
            loss, _ = self.objective(batch, self.w_row.expand(len(batch.embeds), -1), self.run_args.last_step_multiplier)
        loss.backward()
        return loss.detach()


STEPS = {"rocm_kl": RocmBench, "rocm_fdiv": RocmBench, "rlcm_ppo": PpoBench, "cm_dpo": DpoBench}


def benchmark_rows(args: Args) -> list[tuple[str, str, Callable[..., Bench]]]:
    """(row name, path, builder), the eager rocm_kl step first: it is the reference of the speed column."""
    named = []
    for script in args.scripts:
        if script == "rocm_fdiv":
            named += [(f"rocm_fdiv[{name}]", functools.partial(RocmBench, script, divergence=name))
                      for name in args.divergences]
        else:
            named.append((script, functools.partial(STEPS[script], script)))
    if args.fast:
        return [("rocm_kl", "eager", functools.partial(RocmBench, "rocm_kl"))] + [(n, "fast", b) for n, b in named]
    return [(n, "eager", b) for n, b in sorted(named, key=lambda item: item[0] != "rocm_kl")]


def speed_up(unet, vae, channels_last: bool, compile: bool, backend: str = "inductor") -> None:
    """The fast path's speed levers, applied in place after the LoRA is attached (moved out of the scripts until a
    GPU run shows them faster; they train the eager path).

    channels_last stores the convolution weights NHWC (the convolutions then run NHWC). compile compiles the
    repeated blocks, not the whole model: each UNet down/mid/up block and the VAE decoder gets module.compile(),
    which keeps the module tree and the parameter names, so the LoRA state dict has no `_orig_mod` in its keys and
    gradient checkpointing wraps the compiled blocks unchanged.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if compile:
        # adapters on/off, grad on/off, train/eval and batch sizes each add a variant of a block
        config = torch._dynamo.config  # the limit was called cache_size_limit before torch 2.6
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks, vae.decoder]:
            if block is not None:
                block.compile(backend=backend)


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


def max_relative_difference(values: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest gap of two lists of tensors (loss, then gradients), each relative to the reference tensor's largest entry."""
    return max(((value - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
               for value, ref in zip(values, reference))


def measure(bench: Bench, args: Args, fast: bool) -> dict:
    """FLOPs of one eager step; for the fast path the parity check, then compile and channels_last; then the timing."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # counted on the eager path: compiled kernels bypass the counter
        bench.step()
    figures = {"flop_per_image": counter.get_total_flops() / bench.images, "max_rel_diff": None}
    if fast:
        eager = bench.parity_values()
        speed_up(bench.unet, bench.vae, channels_last=True, compile=True, backend=args.compile_backend)
        figures["max_rel_diff"] = max_relative_difference(bench.parity_values(), eager)
    for _ in range(args.warmup):
        bench.step()
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    seconds = statistics.median(timed(bench.step, bench.device) for _ in range(args.repeats))
    figures["s_per_image"] = seconds / bench.images
    figures["peak_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" \
        else float("nan")
    return figures


def main(args: Args) -> None:
    from common import DIVERGENCES

    if args.resolution == 0:
        args.resolution = 32 if args.scale == "tiny" else 1024 if args.base.startswith("sdxl") else 512
    if args.guidance_scale == 0:
        args.guidance_scale = BASES[args.base][1]
    unknown = [script for script in args.scripts if script not in STEPS]
    if unknown:
        raise SystemExit(f"error: no benchmark for {', '.join(unknown)}; choose from: {', '.join(STEPS)}")
    unknown = [name for name in args.divergences if name not in DIVERGENCES]
    if unknown:
        raise SystemExit(f"error: unknown divergence {', '.join(unknown)}; choose from: {', '.join(DIVERGENCES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: CUDA is not available here; pass --scale tiny --device cpu --mixed-precision no")
    if args.fast and args.compile_backend == "inductor" and not args.device.startswith("cuda"):
        raise SystemExit("error: --fast with inductor needs a CUDA device: inductor's CPU backend returns zero "
                         "gradients through the UNet's upsampling blocks (benchmarks/inductor_gradient_check.py); "
                         "pass --compile-backend aot_eager to check the harness on a CPU")
    device = torch.device(args.device)
    models = build_models(args)
    rate = matmul_rate(device, weight_dtype(args))
    print(f"matmul rate ({weight_dtype(args)}): {rate / 1e12:.1f} TFLOP/s")
    tolerance = PARITY_TOLERANCE[args.mixed_precision]

    import diffusers

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    guidance = "w-conditioned" if "lcm_lora" not in BASES[args.base][0] else \
        "classifier-free, two UNet passes" if args.guidance_scale > 1 else "one UNet pass"
    lines = [f"Training step per image, base {args.base} (guidance {args.guidance_scale:g}, {guidance}), "
             f"{args.scale} scale, {args.resolution} px, K={args.num_inference_steps}, LoRA r16, {args.mixed_precision}, "
             f"checkpointing on. {hardware}, torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}, {datetime.date.today()}; matmul rate measured in the same run: "
             f"{rate / 1e12:.1f} TFLOP/s. Path fast: compiled blocks + channels_last ({args.compile_backend}); its parity "
             f"column is the largest gap of loss and LoRA gradients to the eager path on the same inputs, relative to "
             f"each tensor's largest entry (tolerance {tolerance:g}). Speed: eager rocm_kl's ms / image over the row's.",
             "", "| base | script | path | batch | images / step | ms / image | GFLOP / image | TFLOP/s | "
             "% of matmul rate | peak GiB | speed vs eager rocm_kl | parity |", "|---" * 12 + "|"]
    reference, failures = {}, []
    for batch_size in args.batch_sizes:
        for name, path, build in benchmark_rows(args):
            bench = build(args, models, batch_size)
            figures = measure(bench, args, fast=path == "fast")
            if (name, path) == ("rocm_kl", "eager"):
                reference[batch_size] = figures["s_per_image"]
            achieved = figures["flop_per_image"] / figures["s_per_image"]
            speed = f"{reference[batch_size] / figures['s_per_image']:.2f}x" if batch_size in reference else "-"
            parity = "-"
            if figures["max_rel_diff"] is not None:
                parity = f"{figures['max_rel_diff']:.1e}"
                print(f"{name} batch {batch_size}: fast path vs eager, max relative difference of loss and LoRA "
                      f"gradients {parity} (tolerance {tolerance:g})")
                if not figures["max_rel_diff"] <= tolerance:
                    failures.append(f"{name} batch {batch_size} ({parity})")
            row = (f"| {args.base} | {name} | {path} | {batch_size} | {bench.images} | "
                   f"{figures['s_per_image'] * 1e3:.1f} | {figures['flop_per_image'] / 1e9:.1f} | {achieved / 1e12:.2f} | "
                   f"{100 * achieved / rate:.1f} | {figures['peak_gib']:.1f} | {speed} | {parity} |")
            print(row)
            lines.append(row)
            del bench
            if path == "fast":  # drop the compiled blocks' caches, which may keep this row's models alive
                torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    if failures:
        raise SystemExit(f"error: the fast path's loss or gradients differ from the eager path's beyond {tolerance:g}: "
                         + ", ".join(failures))


if __name__ == "__main__":
    main(tyro.cli(Args))
