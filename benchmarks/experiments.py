"""Reproduce the ROCM paper's experiments in the digits world: Table 1, Figure 4 and Figure 5 analogues.

The digits world (world/digits/README.md) is a small but really trained text-to-image LCM with two
differentiable rewards in the real models' formats: a CLIP (text alignment, used as `clipscore`)
and an aesthetic-format head that scores stroke thickness (`aesthetic`). Every method here trains
on `aesthetic` and is judged on what it was NOT trained on: the held-out CLIP score, and two
evaluation-only judges no model ever saw (digit accuracy of a held-out classifier, Frechet distance
to real held-out digits in that classifier's features), on held-out prompts.

- table1:     rocm_fdiv.py with none / kl / reverse_kl / hellinger / js / fisher, rlcm_ppo.py and
              cm_dpo.py, over --seeds; every run also logs held-out curves (the Figure 5 analogue:
              training reward and held-out CLIP score against wall-clock time and training images).
- beta_sweep: rocm_kl.py over --betas (the Figure 4 analogue: where held-out metrics peak and
              where reward hacking starts).
- headline:   rocm_fdiv.py --divergence hellinger at the digits-world equivalents of the headline
              command `--beta 1e-3` (--headline-betas) against --divergence none, with their
              train/kl (headline_hellinger.md; not part of the default call).

Each run is a subprocess of the script a user runs (one torch thread each, --jobs at a time), then
benchmarks/evaluate.py scores its final LoRA. Finished runs are reused, so a second call only
redraws; --force retrains. Writes, under --out: table1.md, beta_sweep.md, beta_sweep.png,
curves.png, grids.png, headline_hellinger.md and results.json (every number behind them); runs/ and
evals/ hold the raw run directories and per-run evaluations. Only the full default call writes the
committed benchmarks/results; any other call (fewer seeds, methods or experiments) writes
benchmarks/results/partial unless --out says where. A call that runs some configurations replaces
only their entries of its results.json and keeps the others.

    python benchmarks/experiments.py                               # everything (about 45 minutes, 2 cores)
    python benchmarks/experiments.py --experiments beta_sweep --seeds 0
    python benchmarks/experiments.py --experiments table1 --methods rocm-kl rocm-js --force   # two rows anew
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]

# near the base, Hellinger^2 and JS ~ KL / 4, and Fisher = KL * 2 / sigma'^2 (2.2 to 5.7 over the
# digits world's 4-step chain): these factors give every divergence about the same pull as KL
# (every divergence summed over the latent, rocm_fdiv's per_dim as its joint: one beta scale)
BETA_FACTORS = {"none": 0.0, "kl": 1.0, "reverse_kl": 1.0, "hellinger": 4.0, "js": 4.0, "fisher": 0.25}
ROCM_METHODS = tuple(f"rocm-{name}" for name in BETA_FACTORS)
METHODS = (*ROCM_METHODS, "rlcm", "cm-dpo")
CURVE_METHODS = ("rocm-kl", "rocm-none", "rlcm", "cm-dpo")
EXPERIMENTS = ("table1", "beta_sweep", "headline")
HELD_OUT = ("clipscore", "digit_accuracy", "frechet_distance")  # never the reward trained on
LOWER_IS_BETTER = {"frechet_distance"}
LABELS = {"aesthetic": "aesthetic (trained on)", "clipscore": "CLIP score (held out)",
          "digit_accuracy": "digit accuracy (judge)", "frechet_distance": "Frechet distance (judge, lower is better)"}


@dataclass
class Args:
    out: Optional[str] = None
    """results directory (tables, figures, results.json; raw runs in runs/ and evals/); unset: benchmarks/results for
    the full default call, benchmarks/results/partial for any other, so a partial rerun never replaces the committed
    results (pass --out benchmarks/results to update them on purpose)"""
    world: str = "world/digits"
    """digits-world directory: lcm/, clip/, aesthetic/, prompts_train.txt, prompts_eval.txt"""
    experiments: tuple[Literal["table1", "beta_sweep", "headline"], ...] = ("table1", "beta_sweep")
    """which experiments to run (the report keeps the results.json entries of configurations not run in this call)"""
    methods: tuple[str, ...] = METHODS
    """table1 methods: rocm-<divergence>, rlcm, cm-dpo"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of every configuration (mean and standard deviation across them)"""
    train_steps: int = 40
    """optimizer steps of ROCM and CM-DPO (4 training images per step for both)"""
    ppo_iterations: int = 30
    """RLCM iterations (16 sampled images each: about ROCM's wall-clock budget, 3x its images)"""
    lr: float = 1e-3
    """learning rate of every method"""
    kl_beta: float = 0.03
    """Table 1's KL weight (the sweep's best rocm_kl beta; rocm_fdiv's per_dim KL is the joint KL); see BETA_FACTORS"""
    dpo_beta: float = 3.0
    """CM-DPO's beta (cm_dpo.py's default for online pairs; log-ratios per latent dimension)"""
    betas: tuple[float, ...] = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    """rocm_kl.py's (joint) KL weights for the beta sweep"""
    headline_betas: tuple[float, ...] = (1e-3, 0.064)
    """hellinger betas of the headline check: the headline's 1e-3 as typed, and 1e-3 x 64 (16,384 / 256 latent dims: the same total pull per image at the same per-dimension drift)"""
    eval_every: int = 5
    """held-out evaluation interval of every run, in its own steps (the curves' points)"""
    eval_samples_per_prompt: int = 20
    """images per held-out prompt in the final evaluation of each LoRA"""
    jobs: int = 2
    """runs at a time, one torch thread each"""
    force: bool = False
    """retrain and re-evaluate runs that have already finished"""


@dataclass
class Run:
    """One training run and the evaluation of its final LoRA."""

    experiment: str
    method: str
    seed: int
    script: str
    flags: list[str] = field(default_factory=list)

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.experiment / self.method / f"seed{self.seed}"

    def eval_file(self, out: Path) -> Path:
        return out / "evals" / self.experiment / f"{self.method}__seed{self.seed}.json"


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------

def method_flags(method: str, args: Args) -> tuple[str, list[str]]:
    """(script, algorithm flags) of a Table 1 method."""
    if method.startswith("rocm-") and method[5:] in BETA_FACTORS:
        divergence = method[5:]
        return "rocm_fdiv.py", rocm_fdiv_flags(divergence, args.kl_beta * BETA_FACTORS[divergence], args)
    if method == "rlcm":
        return "rlcm_ppo.py", ["--train-steps", str(args.ppo_iterations), "--batch-size", "8", "--sample-batches", "2",
                               "--train-batch-size", "8", "--grad-accum", "1"]
    if method == "cm-dpo":
        return "cm_dpo.py", ["--train-steps", str(args.train_steps), "--batch-size", "2", "--samples-per-prompt", "2",
                             "--beta", f"{args.dpo_beta:g}"]
    raise SystemExit(f"error: unknown method '{method}'; choose from: {', '.join(METHODS)}")


def rocm_fdiv_flags(divergence: str, beta: float, args: Args) -> list[str]:
    """rocm_fdiv.py's algorithm flags at Table 1's budget."""
    return ["--divergence", divergence, "--beta", f"{beta:g}", "--train-steps", str(args.train_steps), "--batch-size", "4"]


def beta_label(beta: float) -> str:
    return f"beta={beta:g}"


def plan(args: Args) -> list[Run]:
    runs = []
    if "table1" in args.experiments:
        for method in args.methods:
            script, flags = method_flags(method, args)
            runs += [Run("table1", method, seed, script, flags) for seed in args.seeds]
    if "beta_sweep" in args.experiments:
        for beta in args.betas:
            flags = ["--beta", f"{beta:g}", "--train-steps", str(args.train_steps), "--batch-size", "4"]
            runs += [Run("beta_sweep", beta_label(beta), seed, "rocm_kl.py", flags) for seed in args.seeds]
    if "headline" in args.experiments:
        configurations = [("rocm-none", 0.0, "none")]
        configurations += [(f"rocm-hellinger-{beta_label(beta)}", beta, "hellinger") for beta in args.headline_betas]
        for method, beta, divergence in configurations:
            flags = rocm_fdiv_flags(divergence, beta, args)
            runs += [Run("headline", method, seed, "rocm_fdiv.py", flags) for seed in args.seeds]
    return runs


def world_paths(args: Args) -> dict[str, Path]:
    world = Path(args.world)
    paths = {name: world / name for name in ("lcm", "clip", "aesthetic", "prompts_train.txt", "prompts_eval.txt")}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise SystemExit(f"error: the world directory '{world}' lacks {', '.join(missing)}; pass --world a digits world "
                         "(python -m world.build_digits_world --out DIR builds one)")
    return paths


def common_flags(paths: dict[str, Path], eval_prompts: Path) -> list[str]:
    """Model, rewards, prompts and sizes shared by every training run and evaluation."""
    return ["--model", str(paths["lcm"]), "--resolution", "32", "--num-inference-steps", "4",
            "--device", "cpu", "--mixed-precision", "no",
            "--eval-rewards", f"clipscore={paths['clip']}", f"aesthetic={paths['aesthetic']}",
            "--eval-prompts-file", str(eval_prompts)]


def run_command(command: list[str], log: Path) -> bool:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode == 0


def final_lora(run_dir: Path) -> Path | None:
    finals = sorted(run_dir.glob("*/final/pytorch_lora_weights.safetensors"))
    return finals[-1].parent if finals else None


def train_command(run: Run, args: Args, paths: dict[str, Path], curve_prompts: Path) -> list[str]:
    """The command line that trains a run (the script as a user runs it)."""
    return [sys.executable, str(REPO / run.script), *common_flags(paths, curve_prompts),
            "--reward", f"aesthetic={paths['aesthetic']}", "--prompts-file", str(paths["prompts_train.txt"]),
            "--lr", f"{args.lr:g}", "--seed", str(run.seed), "--eval-every", str(args.eval_every),
            "--exp-name", run.method, "--output-dir", str(run.directory(Path(args.out))), *run.flags]


def execute(run: Run, args: Args, paths: dict[str, Path], curve_prompts: Path) -> str:
    """Train (unless a final LoRA exists), then evaluate (unless done). Returns a status line."""
    out = Path(args.out)
    run_dir, eval_file = run.directory(out), run.eval_file(out)
    if args.force:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        eval_file.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    name = f"{run.experiment}/{run.method}/seed{run.seed}"
    if final_lora(run_dir) is None:
        if not run_command(train_command(run, args, paths, curve_prompts), log) or final_lora(run_dir) is None:
            return f"FAILED {name} (training; see {log})"
    if not eval_file.is_file():
        eval_file.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(REPO / "benchmarks" / "evaluate.py"),
                   *common_flags(paths, paths["prompts_eval.txt"]), "--lora", str(final_lora(run_dir)), "--digits",
                   "--samples-per-prompt", str(args.eval_samples_per_prompt), "--output", str(eval_file)]
        if not run_command(command, log):
            return f"FAILED {name} (evaluation; see {log})"
    return f"done {name}"


def evaluate_base(args: Args, paths: dict[str, Path]) -> Path:
    eval_file = Path(args.out) / "evals" / "base.json"
    if args.force or not eval_file.is_file():
        eval_file.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(REPO / "benchmarks" / "evaluate.py"),
                   *common_flags(paths, paths["prompts_eval.txt"]), "--digits",
                   "--samples-per-prompt", str(args.eval_samples_per_prompt), "--output", str(eval_file)]
        if not run_command(command, eval_file.with_suffix(".log")):
            raise SystemExit(f"error: evaluating the base model failed; see {eval_file.with_suffix('.log')}")
    return eval_file


# --------------------------------------------------------------------------------------------
# Reading the runs
# --------------------------------------------------------------------------------------------

def images_per_step(script_args: dict) -> int:
    """Training images one step of a script generates (from its args.json), on one process."""
    if "sample_batches" in script_args:  # rlcm_ppo: an iteration samples sample_batches x batch_size
        return script_args["batch_size"] * script_args["sample_batches"]
    pairs_images = script_args.get("samples_per_prompt", 1) if script_args.get("pairs") == "online" else 1
    return script_args["batch_size"] * script_args["grad_accum"] * pairs_images


def read_curves(run_dir: Path) -> dict[str, list[float]]:
    """Cumulative training time (s) and images at every logged step, with the training reward and the
    held-out evaluations; time counts training steps only (not evaluation, loading or compilation)."""
    metrics_file = next(run_dir.glob("*/metrics.jsonl"))
    per_step = images_per_step(json.loads((metrics_file.parent / "args.json").read_text()))
    time_at, images_at, elapsed = {0: 0.0}, {0: 0}, 0.0
    curves: dict[str, list[float]] = {"train_step": [], "train_time": [], "train_images": [], "train_reward": [],
                                      "eval_step": [], "eval_time": [], "eval_images": [], "eval_clipscore": [],
                                      "eval_aesthetic": [], "eval_diversity": [], "train_kl": []}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    for row in rows:
        if "perf/step_time_s" in row:
            elapsed += row["perf/step_time_s"]
            time_at[row["step"]], images_at[row["step"]] = elapsed, row["step"] * per_step
            for key, value in (("train_step", row["step"]), ("train_time", elapsed),
                               ("train_images", row["step"] * per_step), ("train_reward", row["train/reward"])):
                curves[key].append(value)
            if "train/kl" in row:  # the ROCM scripts' drift from the base (empty for the others)
                curves["train_kl"].append(row["train/kl"])
    for row in rows:
        if "eval/clipscore" in row:
            for key, value in (("eval_step", row["step"]), ("eval_time", time_at.get(row["step"], math.nan)),
                               ("eval_images", images_at.get(row["step"], math.nan)),
                               ("eval_clipscore", row["eval/clipscore"]), ("eval_aesthetic", row["eval/aesthetic"]),
                               ("eval_diversity", row.get("eval/diversity", math.nan))):  # nan: a run older than it
                curves[key].append(value)
    return curves


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def collect(args: Args, runs: list[Run]) -> dict:
    """Every finished run's evaluation and curves, grouped by experiment and method; configurations
    this call did not run keep their entries of the previous results.json."""
    out = Path(args.out)
    results = {"base": json.loads((out / "evals" / "base.json").read_text())["results"],
               **{experiment: {} for experiment in EXPERIMENTS}}
    for run in runs:
        if not run.eval_file(out).is_file():
            continue
        entry = results[run.experiment].setdefault(run.method, {"script": run.script, "flags": run.flags,
                                                                "seeds": [], "evals": [], "curves": []})
        entry["seeds"].append(run.seed)
        entry["evals"].append(json.loads(run.eval_file(out).read_text())["results"])
        entry["curves"].append(read_curves(run.directory(out)))
    for experiment in EXPERIMENTS:
        for entry in results[experiment].values():
            metrics = entry["evals"][0].keys()
            entry["summary"] = {metric: mean_std([e[metric] for e in entry["evals"]]) for metric in metrics}
            entry["summary"]["train_time_s"] = mean_std([c["train_time"][-1] for c in entry["curves"]])
            entry["summary"]["train_images"] = mean_std([c["train_images"][-1] for c in entry["curves"]])
    previous_file = out / "results.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    return merge_results(results, previous, {(run.experiment, run.method) for run in runs})


def merge_results(fresh: dict, previous: dict, planned: set[tuple[str, str]]) -> dict:
    """fresh, plus the entries of previous whose (experiment, method) was not planned in this call, in
    previous's order (new configurations last): a partial rerun replaces its rows and keeps the rest
    (run directories are not in git, results.json is)."""
    merged = dict(fresh)
    for experiment in EXPERIMENTS:
        old = previous.get(experiment, {})
        kept = {method: entry for method, entry in old.items() if (experiment, method) not in planned}
        order = dict.fromkeys([*old, *fresh[experiment]])
        merged[experiment] = {method: fresh[experiment].get(method, kept.get(method)) for method in order
                              if method in fresh[experiment] or method in kept}
    return merged


# --------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------

def cell(summary: dict, metric: str, digits: int = 3) -> str:
    mean, std = summary[metric]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(results: dict, experiment: str, first_column: str) -> str:
    """Mean ± std over seeds of the trained reward, the held-out metrics and the training cost."""
    metrics = ("aesthetic", *HELD_OUT)
    header = [first_column, *(LABELS[m] for m in metrics), "training time (s)", "training images"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    base = results["base"]
    lines.append("| base (no training) | " + " | ".join(f"{base[m]:.3f}" for m in metrics) + " | 0 | 0 |")
    for method, entry in results[experiment].items():
        summary = entry["summary"]
        cells = [cell(summary, m) for m in metrics]
        cells += [f"{summary['train_time_s'][0]:.0f}", f"{summary['train_images'][0]:.0f}"]
        lines.append(f"| {method} (n={len(entry['seeds'])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_betas(results: dict) -> list[tuple[float, dict]]:
    return sorted((float(method.split("=")[1]), entry["summary"]) for method, entry in results["beta_sweep"].items())


def plot_beta_sweep(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep_betas(results)
    positive = [beta for beta, _ in points if beta > 0]
    # beta = 0 (no regularization) is drawn one decade left of the smallest positive beta
    zero_at = min(positive) / 10 if positive else 1.0
    xs = [beta if beta > 0 else zero_at for beta, _ in points]
    metrics = ("aesthetic", *HELD_OUT)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
    for axis, metric in zip(axes, metrics):
        means = [summary[metric][0] for _, summary in points]
        stds = [summary[metric][1] for _, summary in points]
        axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3)
        axis.axhline(results["base"][metric], color="gray", linestyle="--", label="base")
        axis.set_xscale("log")
        if metric == "frechet_distance":  # spans 1 to 40: a log axis shows the dip below the base
            axis.set_yscale("log")
        axis.set_xticks(xs, [f"{beta:g}" for beta, _ in points], rotation=45)
        axis.minorticks_off()
        axis.set_xlabel("beta (KL weight; 0 = unregularized)")
        axis.set_title(LABELS[metric], fontsize=9)
        axis.legend(fontsize=8)
    figure.suptitle("ROCM-KL beta sweep in the digits world (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def average_curve(curves: list[dict], x_key: str, y_key: str, window: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seed average, point by point (every seed logs the same steps; x is averaged too, as time varies),
    then a moving average over `window` points (training rewards are one noisy batch each)."""
    length = min(len(c[y_key]) for c in curves)
    xs = np.mean([c[x_key][:length] for c in curves], axis=0)
    ys = np.mean([c[y_key][:length] for c in curves], axis=0)
    window = max(1, min(window, length))
    kernel = np.ones(window) / window
    return xs[window - 1:], np.convolve(ys, kernel, mode="valid")


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("train_reward", "training reward (aesthetic, training prompts)"),
               ("eval_aesthetic", "aesthetic on held-out prompts"), ("eval_clipscore", "CLIP score on held-out prompts")]
    figure, axes = plt.subplots(2, len(columns), figsize=(4.4 * len(columns), 6.6))
    for row, x_name in enumerate(("time", "images")):
        for axis, (y_key, title) in zip(axes[row], columns):
            prefix = y_key.split("_")[0]
            for method in CURVE_METHODS:
                if method in results["table1"]:
                    xs, ys = average_curve(results["table1"][method]["curves"], f"{prefix}_{x_name}", y_key,
                                           window=5 if prefix == "train" else 1)
                    axis.plot(xs, ys, marker="." if prefix == "eval" else None, label=method)
            axis.set_xlabel("training wall-clock (s, 1 CPU thread)" if x_name == "time" else "training images generated")
            axis.set_title(title, fontsize=9)
            axis.legend(fontsize=8)
    figure.suptitle("Figure 5 analogue: ROCM vs RLCM vs CM-DPO in the digits world (mean over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pick_grid_runs(results: dict) -> list[tuple[str, str]]:
    """(label, method) of the side-by-side grid: the regularized ROCM method whose samples the
    evaluation-only judge finds closest to real digits (lowest Frechet distance), and the unregularized run."""
    table = results["table1"]
    regularized = [m for m in table if m.startswith("rocm-") and m != "rocm-none"]
    picks = []
    if regularized:
        best = min(regularized, key=lambda m: table[m]["summary"]["frechet_distance"][0])
        picks.append((f"best regularized: {best}", best))
    if "rocm-none" in table:
        picks.append(("unregularized: rocm-none", "rocm-none"))
    return picks


def plot_grids(results: dict, args: Args, path: Path, columns: int = 6) -> bool:
    """The base, the best regularized and the unregularized run (seed 0 or the first seed) side by side:
    one row per held-out prompt, the first `columns` samples of each (same noise for all three).
    False (nothing drawn) when a panel's sample grid is not on disk (a run kept from results.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out = Path(args.out)
    panels = [("base", out / "evals" / "base.png")]
    for label, method in pick_grid_runs(results):
        seed = results["table1"][method]["seeds"][0]
        panels.append((label, out / "evals" / "table1" / f"{method}__seed{seed}.png"))
    if not all(grid_file.is_file() for _, grid_file in panels):
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 5.2))
    for axis, (label, grid_file) in zip(np.atleast_1d(axes), panels):
        grid = np.asarray(Image.open(grid_file).convert("RGB"))
        side = grid.shape[1] // args.eval_samples_per_prompt  # evaluate.py writes one row per prompt
        axis.imshow(grid[:, :columns * side])
        axis.set_title(label, fontsize=9)
        axis.axis("off")
    figure.suptitle("held-out prompts (rows: zero..nine), same noise", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def headline_report(args: Args, results: dict, paths: dict[str, Path], curve_prompts: Path) -> str:
    """headline_hellinger.md: does the headline command regularize? train/kl and the held-out judges of
    rocm_fdiv --divergence hellinger at the headline betas against --divergence none, with the commands."""
    def kl_cell(entry: dict, last: int | None) -> str:
        per_seed = [float(np.mean(c["train_kl"][-last:] if last else c["train_kl"])) for c in entry["curves"]]
        mean, std = mean_std(per_seed)
        return f"{mean:.3g} ± {std:.2g}"

    metrics = ("aesthetic", *HELD_OUT)
    lines = [
        "# The headline command in the digits world",
        "",
        "`python rocm_fdiv.py --divergence hellinger --beta 1e-3` trains at 512 px: a 4x64x64 latent, 16,384",
        "dimensions. rocm_fdiv's default `--reduction per_dim` sums the 1-D marginals' divergences over the",
        "latent, so at the same drift per dimension a digits-world image (4x8x8 latent, 256 dimensions) carries",
        "64x less divergence than a 512 px one. Two digits-world equivalents of the headline: beta 1e-3 as",
        "typed, and 1e-3 x 64 = 0.064, the same total pull per image. Each against `--divergence none`",
        f"(same seeds {', '.join(map(str, args.seeds))}, {args.train_steps} steps of 4 images, lr {args.lr:g},"
        " the rest as Table 1). train/kl is the joint KL to the base",
        "summed over the chain's stochastic steps, per training image (rocm_fdiv logs it for every divergence);",
        "the other columns are the final LoRA's held-out evaluation (benchmarks/evaluate.py --digits, as in Table 1).",
        "Mean ± standard deviation over seeds.",
        "",
        "| run | beta | train/kl, last 5 steps | train/kl, all steps | " + " | ".join(LABELS[m] for m in metrics) + " |",
        "|---" * (4 + len(metrics)) + "|",
        "| base (no training) | - | 0 | 0 | " + " | ".join(f"{results['base'][m]:.3f}" for m in metrics) + " |",
    ]
    for method, entry in results["headline"].items():
        beta = entry["flags"][entry["flags"].index("--beta") + 1]
        cells = [kl_cell(entry, 5), kl_cell(entry, None), *(cell(entry["summary"], m) for m in metrics)]
        lines.append(f"| {method} (n={len(entry['seeds'])}) | {beta} | " + " | ".join(cells) + " |")
    commands = [f"python benchmarks/experiments.py --experiments headline --seeds {' '.join(map(str, args.seeds))}",
                "# which trains (one run per seed; seed 0 shown):"]
    for method, entry in results["headline"].items():
        run = Run("headline", method, entry["seeds"][0], entry["script"], entry["flags"])
        commands.append(" ".join(["python", run.script, *train_command(run, args, paths, curve_prompts)[2:]]))
    return "\n".join([*lines, "", "Commands:", "", "```bash", *commands, "```", ""])


def write_report(args: Args, results: dict, paths: dict[str, Path], curve_prompts: Path) -> list[Path]:
    out = Path(args.out)
    written = [out / "results.json"]
    written[0].write_text(json.dumps({"args": asdict(args), **results}, indent=1))
    if results["table1"]:
        (out / "table1.md").write_text(markdown_table(results, "table1", "method"))
        plot_curves(results, out / "curves.png")
        written += [out / "table1.md", out / "curves.png"]
        if plot_grids(results, args, out / "grids.png"):
            written.append(out / "grids.png")
        else:
            print("kept grids.png as it was: a run it shows was not rerun here (its sample grid is not on disk)")
    if results["headline"]:
        (out / "headline_hellinger.md").write_text(headline_report(args, results, paths, curve_prompts))
        written.append(out / "headline_hellinger.md")
    if results["beta_sweep"]:
        (out / "beta_sweep.md").write_text(markdown_table(results, "beta_sweep", "rocm_kl.py"))
        plot_beta_sweep(results, out / "beta_sweep.png")
        written += [out / "beta_sweep.md", out / "beta_sweep.png"]
    return written


def results_dir(args: Args) -> str:
    """--out, or where this call's results go: only the full default call writes the committed results."""
    if args.out is not None:
        return args.out
    if args == Args(jobs=args.jobs, force=args.force):
        return "benchmarks/results"
    return "benchmarks/results/partial"


def main(args: Args) -> dict:
    if args.jobs < 1 or not args.seeds or args.train_steps < 1 or args.ppo_iterations < 1:
        raise SystemExit("error: --jobs, --train-steps and --ppo-iterations must be >= 1 and --seeds non-empty")
    args.out = results_dir(args)
    print(f"results go to {args.out}")
    paths = world_paths(args)
    runs = plan(args)  # checks the method names before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the in-run held-out curves score each evaluation prompt 4 times (fixed noise): 4x less noisy
    curve_prompts = out / "eval_prompts_x4.txt"
    curve_prompts.write_text("\n".join([paths["prompts_eval.txt"].read_text().strip()] * 4) + "\n")
    evaluate_base(args, paths)
    print(f"{len(runs)} runs, {args.jobs} at a time; logs in {out / 'runs'}")
    with ThreadPoolExecutor(args.jobs) as pool:
        statuses = list(pool.map(lambda run: execute(run, args, paths, curve_prompts), runs))
    for status in statuses:
        print(status)
    results = collect(args, runs)
    for path in write_report(args, results, paths, curve_prompts):
        print(f"wrote {path}")
    failed = [status for status in statuses if status.startswith("FAILED")]
    if failed:
        raise SystemExit(f"error: {len(failed)} runs failed (listed above); fix them and rerun (finished runs are kept)")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
