"""CM-DPO's beta in the digits world: does L_DPO keep its gradient, and does the policy move the preferred way?

Offline pairs with a known preferred direction (write_thickness_pairs): real digits of the world's
data (scikit-learn's load_digits, rendered as the world renders them), the winner a thick-stroke
image and the loser a thin one of the same digit (top and bottom ink-mass terciles of the training
split), one pair list per training prompt. Online pairs are ranked by the aesthetic (stroke
thickness) reward, the direction the offline pairs prefer too.

For every pair mode and beta, cm_dpo.py runs in the digits world with Table 1's settings (lr 1e-3,
2 pairs per step, 2 samples per prompt, the world's flags from benchmarks/experiments.py) and
otherwise its defaults; read from its metrics: loss_dpo per step (the mean over kept pairs) and the
held-out aesthetic (thickness) before and after. Writes --out/cm_dpo_beta.md and .json.

    python benchmarks/cm_dpo_beta.py                        # betas 0.1 1 25.6, 20 steps, both modes
    python benchmarks/cm_dpo_beta.py --betas 1 --modes offline --reverse   # thin preferred instead
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.experiments import common_flags, run_command, world_paths  # noqa: E402


def write_thickness_pairs(directory: Path, prompts: list[str], pairs_per_prompt: int = 4, seed: int = 0,
                          reverse: bool = False) -> Path:
    """directory/pairs.jsonl and its PNGs: per prompt, thick (winner) vs thin (loser) real digits of its digit.

    reverse: thin wins instead. Images come from the training split only (the held-out evaluation
    digits stay unseen).
    """
    import torch
    from PIL import Image

    from world.digits_metrics import digit_of, ink_mass, ink_of_images, real_digits

    images, _, labels = real_digits("train")
    mass = ink_mass(ink_of_images(images))
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for p, prompt in enumerate(prompts):
        mine = torch.nonzero(labels == digit_of(prompt)).flatten()
        order = mine[torch.argsort(mass[mine])].tolist()
        third = len(order) // 3
        thin, thick = order[:third], order[-third:]
        for i in range(pairs_per_prompt):
            names = []
            for kind, pool in (("thick", thick), ("thin", thin)):
                index = rng.choice(pool)
                name = f"images/{p:02d}_{i}_{kind}.png"
                pixels = (images[index].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(directory / name)
                names.append(name)
            winner, loser = names[::-1] if reverse else names
            lines.append(json.dumps({"prompt": prompt, "winner": winner, "loser": loser}))
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "pairs.jsonl"


@dataclass
class Args:
    out: str = "benchmarks/results"
    """where cm_dpo_beta.md / .json are written (raw runs in OUT/cm_dpo_beta/)"""
    world: str = "world/digits"
    """digits-world directory: lcm/, clip/, aesthetic/, prompts_train.txt, prompts_eval.txt"""
    betas: tuple[float, ...] = (0.1, 1.0, 25.6)
    """cm_dpo.py betas to measure (25.6 = the old default 0.1 on log-ratios summed over the 256 latent dims)"""
    modes: tuple[Literal["offline", "online"], ...] = ("offline", "online")
    """pair modes to measure"""
    steps: int = 20
    """optimizer steps per run"""
    lr: float = 1e-3
    """learning rate (Table 1's)"""
    seed: int = 0
    """seed of the runs and of the offline pairs' choice"""
    reverse: bool = False
    """offline pairs prefer the THIN digit (the seed form moves the same way either way)"""
    dpo_form: Literal["logratio", "seed"] = "logratio"
    """cm_dpo.py --dpo-form"""


def run(args: Args, mode: str, beta: float, pairs_file: Path) -> dict:
    paths = world_paths(args)
    run_dir = Path(args.out) / "cm_dpo_beta" / f"{mode}_{args.dpo_form}{'_reverse' if args.reverse else ''}_beta{beta:g}"
    command = [sys.executable, str(REPO / "cm_dpo.py"), *common_flags(paths, paths["prompts_eval.txt"]),
               "--prompts-file", str(paths["prompts_train.txt"]), "--reward", f"aesthetic={paths['aesthetic']}",
               "--lr", f"{args.lr:g}", "--seed", str(args.seed), "--train-steps", str(args.steps), "--eval-every", "0",
               "--batch-size", "2", "--samples-per-prompt", "2", "--beta", f"{beta:g}", "--dpo-form", args.dpo_form,
               "--exp-name", "cm_dpo", "--output-dir", str(run_dir)]
    if mode == "offline":
        command += ["--pairs", "offline", "--pairs-file", str(pairs_file)]
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run_command(command, run_dir / "log.txt"):
        raise SystemExit(f"error: cm_dpo.py failed; see {run_dir / 'log.txt'}")
    metrics_file = sorted(run_dir.glob("cm_dpo__*/metrics.jsonl"))[-1]
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [m for m in metrics if "train/loss_dpo" in m]
    evals = [m for m in metrics if "eval/aesthetic" in m]
    return {"mode": mode, "beta": beta, "loss_dpo": [m["train/loss_dpo"] for m in train],
            "margin": [m["train/implicit_margin"] for m in train], "kl": [m["train/kl"] for m in train],
            "aesthetic_before": evals[0]["eval/aesthetic"], "aesthetic_after": evals[-1]["eval/aesthetic"]}


def main(args: Args) -> list[dict]:
    paths = world_paths(args)
    prompts = [p for p in paths["prompts_train.txt"].read_text().splitlines() if p.strip()]
    pairs_file = write_thickness_pairs(Path(args.out) / "cm_dpo_beta" / ("pairs_reverse" if args.reverse else "pairs"),
                                       prompts, seed=args.seed, reverse=args.reverse)
    results = []
    for mode in args.modes:
        for beta in args.betas:
            result = run(args, mode, beta, pairs_file)
            results.append(result)
            print(f"{mode} beta={beta:g}: loss_dpo min {min(result['loss_dpo']):.3g}, "
                  f"aesthetic {result['aesthetic_before']:.3f} -> {result['aesthetic_after']:.3f}", flush=True)
    name = f"cm_dpo_beta_{args.dpo_form}{'_reverse' if args.reverse else ''}"
    rows = ["| pairs | beta | loss_dpo min (steps 1-%d) | loss_dpo mean steps 11-%d | margin at step %d | "
            "held-out aesthetic before -> after |" % (args.steps, args.steps, args.steps), "|---|---|---|---|---|---|"]
    for r in results:
        late = r["loss_dpo"][10:] or r["loss_dpo"]
        rows.append(f"| {r['mode']} | {r['beta']:g} | {min(r['loss_dpo']):.3g} | {np.mean(late):.3g} | "
                    f"{r['margin'][-1]:.3g} | {r['aesthetic_before']:.3f} -> {r['aesthetic_after']:.3f} |")
    (Path(args.out) / f"{name}.md").write_text("\n".join(rows) + "\n")
    (Path(args.out) / f"{name}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(rows))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
