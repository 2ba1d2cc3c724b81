"""Reward hacking in sight: the held-out samples' diversity over training, rocm_kl.py at --beta 0 against --beta 0.03.

eval/diversity (every script logs it at every evaluation) is the mean pairwise cosine distance between the CLIP
image embeddings of the samples of one held-out prompt, each from its own chain noise (--eval-samples-per-prompt,
2). The two runs are the ends of benchmarks/experiments.py's beta sweep (rocm_kl.py on the aesthetic reward, 40
steps of 4 images, lr 1e-3, a held-out evaluation every 5 steps): that driver trains and evaluates them (raw runs in
its partial results directory), this reads their curves and writes --out/diversity.md and diversity.png.

    python benchmarks/diversity.py                      # seed 0: about 5 minutes on 2 CPU cores
    python benchmarks/diversity.py --seeds 0 1 2        # the mean over seeds
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import experiments  # noqa: E402

COLUMNS = (("eval_diversity", "diversity"), ("eval_clipscore", "CLIP score (held out)"),
           ("eval_aesthetic", "aesthetic (trained on)"))


@dataclass
class Args:
    out: str = "benchmarks/results"
    """where diversity.md and diversity.png are written"""
    betas: tuple[float, ...] = (0.0, 0.03)
    """rocm_kl.py betas: unregularized, and the beta sweep's best (Table 1's KL weight)"""
    seeds: tuple[int, ...] = (0,)
    """seeds of each beta (the curves are their mean)"""


def report(curves: dict[float, list[dict]], seeds: tuple[int, ...]) -> str:
    """diversity.md: per held-out evaluation step, each beta's diversity, CLIP score and aesthetic (seed mean)."""
    means = {beta: {key: experiments.average_curve(runs, "eval_step", key)[1] for key, _ in COLUMNS}
             for beta, runs in curves.items()}
    steps, _ = experiments.average_curve(next(iter(curves.values())), "eval_step", "eval_diversity")
    header = ["step", *(f"beta={beta:g}: {label}" for beta in curves for _, label in COLUMNS)]
    lines = [f"rocm_kl.py in the digits world, held-out prompts x 4, 2 samples each; mean over seeds "
             f"{', '.join(map(str, seeds))} (`python benchmarks/diversity.py`).", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, step in enumerate(steps):
        cells = [f"{means[beta][key][i]:.3f}" for beta in curves for key, _ in COLUMNS]
        lines.append(f"| {step:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[float, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(COLUMNS), figsize=(4.4 * len(COLUMNS), 3.4))
    for axis, (key, label) in zip(axes, COLUMNS):
        for beta, runs in curves.items():
            axis.plot(*experiments.average_curve(runs, "eval_step", key), marker=".",
                      label=f"beta={beta:g}" + (" (unregularized)" if beta == 0 else ""))
        axis.set_xlabel("training step")
        axis.set_title(f"{label} on held-out prompts", fontsize=9)
        axis.legend(fontsize=8)
    figure.suptitle("Reward hacking in sight: ROCM-KL in the digits world, diversity of a prompt's samples")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(args: Args) -> str:
    sweep = experiments.Args(experiments=("beta_sweep",), betas=args.betas, seeds=args.seeds)
    results = experiments.main(sweep)  # trains what is not trained yet, in its partial results directory
    curves = {beta: results["beta_sweep"][experiments.beta_label(beta)]["curves"] for beta in args.betas}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = report(curves, args.seeds)
    (out / "diversity.md").write_text(table)
    plot(curves, out / "diversity.png")
    print(f"{table}wrote {out / 'diversity.md'} and {out / 'diversity.png'}")
    return table


if __name__ == "__main__":
    main(tyro.cli(Args))
