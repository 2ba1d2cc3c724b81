"""Every script on more processes and across restarts: torchrun over 2 gloo ranks trains what one process trains
with the whole batch, the ranks skip a non-finite update together, a run killed with kill -9 and resumed ends with
the same LoRA as one never stopped, and the saved LoRA loads at the strength it was trained at."""

import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SHORT_RUN_FLAGS, load_tiny, lora_of, run_dir_of, tiny_args

SCRIPTS = SHORT_RUN_FLAGS
# scripts whose update on N ranks x batch b equals one process with batch N*b (not PPO: each rank
# shuffles its own samples into minibatches)
SAME_AS_ONE_PROCESS = ["rocm_kl.py", "rocm_fdiv.py", "cm_dpo.py"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0, f"LoRA weights differ by {worst}"


def assert_same_updates(a: dict, b: dict) -> None:
    """Equal up to float reduction order. Adam divides by |g| + 1e-8, so float noise in small gradients is
    amplified (on some CPUs a quarter of the weights differ by 1e-7 and 5% by 1e-6 after two steps), and
    the rare gradients near zero move by up to lr; a wrong batch split moves nearly every weight by about
    lr (1e-2 here), so a weight counts as differing above 1% of lr."""
    assert a.keys() == b.keys()
    differing = torch.cat([((a[k] - b[k]).abs() > 1e-4).flatten() for k in a]).float().mean().item()
    assert differing < 0.01, f"{differing:.1%} of the LoRA weights differ"


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def script_command(script: str, tiny, tmp_path: Path, *flags: str, steps: int, ranks: int = 0) -> list[str]:
    return [*(torchrun(ranks) if ranks else [sys.executable]), str(REPO / script), *tiny_args(tiny, steps=steps),
            *SCRIPTS[script], "--eval-rewards", "--device", "cpu", "--mixed-precision", "no", "--output-dir",
            str(tmp_path / "runs"), *flags]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_match_one_process(script, tiny, tmp_path):
    two = run(script_command(script, tiny, tmp_path, "--batch-size", "1", steps=2, ranks=2), tmp_path)
    effective = next(line for line in two.stdout.splitlines() if line.startswith("effective batch: "))
    assert "x 2 ranks = 2 " in effective, effective
    if script in SAME_AS_ONE_PROCESS:
        one = run(script_command(script, tiny, tmp_path, "--batch-size", "2", steps=2), tmp_path)
        assert_same_updates(lora_of(run_dir_of(two.stdout) / "final"), lora_of(run_dir_of(one.stdout) / "final"))


@pytest.mark.slow
@pytest.mark.parametrize("script", SAME_AS_ONE_PROCESS)
def test_two_ranks_with_accumulation_match_one_process(script, tiny, tmp_path):
    two = run(script_command(script, tiny, tmp_path, "--batch-size", "1", "--grad-accum", "2", steps=1, ranks=2),
              tmp_path)
    one = run(script_command(script, tiny, tmp_path, "--batch-size", "2", "--grad-accum", "2", steps=1), tmp_path)
    # a rank's micro-batch m holds the global samples m*2b + rank*b ...: 2 ranks x b=1 x 2 micro = 1 x b=2 x 2 micro
    assert_same_updates(lora_of(run_dir_of(two.stdout) / "final"), lora_of(run_dir_of(one.stdout) / "final"))


RANKS_SKIP_TOGETHER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import rocm_kl

run = rocm_kl.Run(rocm_kl.Args(device="cpu", mixed_precision="no", output_dir=sys.argv[3], max_nonfinite_steps=2))
layer = torch.nn.Linear(2, 1)
params = list(layer.parameters())
_, objective = run.begin(layer, torch.optim.SGD(params, lr=0.1), layer, "1 x 2 ranks")
seen = open(f"{sys.argv[2]}/rank_{run.rank}.txt", "w", buffering=1)  # the ranks share stdout: lines would mix
for step, rank_1_finite in [(1, True), (2, False), (3, False)]:
    before = [p.detach().clone() for p in params]
    objective(torch.ones(1, 2)).sum().backward()  # finite gradients on both ranks
    try:
        skipped = run.update(step, run.rank == 0 or rank_1_finite, params, 1.0) is None
    except SystemExit as stop:
        seen.write(f"step {step}: stopped ({stop})\\n")
        raise
    unchanged = all(torch.equal(a, b) for a, b in zip(before, params))
    seen.write(f"step {step}: skipped {skipped}, unchanged {unchanged}\\n")
"""


@pytest.mark.slow
def test_the_ranks_skip_a_non_finite_update_together_and_stop_together(tmp_path):
    """Rank 1 alone sees a non-finite loss: rank 0 skips too (the ranks' weights would part otherwise), and the
    stop after --max-nonfinite-steps ends both ranks (one left alone would wait for the other forever), rank 0
    with the one line."""
    (tmp_path / "check.py").write_text(RANKS_SKIP_TOGETHER)
    result = subprocess.run([*torchrun(2), str(tmp_path / "check.py"), str(REPO), str(tmp_path),
                             str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=ONE_THREAD)
    assert result.returncode != 0
    seen = [(tmp_path / f"rank_{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    for lines in seen:
        assert lines[:2] == ["step 1: skipped False, unchanged False", "step 2: skipped True, unchanged True"], seen
    assert seen[0][2].startswith("step 3: stopped (error: 2 non-finite steps in a row") and \
        seen[1][2] == "step 3: stopped (1)", seen


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_kill_continues_exactly(script, tiny, tmp_path):
    straight = run(script_command(script, tiny, tmp_path, "--save-every", "2", steps=6), tmp_path)

    killed = subprocess.Popen(script_command(script, tiny, tmp_path / "killed", "--save-every", "2", steps=6),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.time() + 600
    while time.time() < deadline and not list((tmp_path / "killed").glob("runs/*/checkpoints/step_000002")):
        assert killed.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    run_dir = next((tmp_path / "killed" / "runs").iterdir())
    assert not (run_dir / "final").exists()

    # the run's own flags are the defaults: --resume alone continues it
    resumed = run([sys.executable, str(REPO / script), "--resume", str(run_dir)], tmp_path)
    assert re.search(r"resumed at (step|iteration) ", resumed.stdout)  # rlcm_ppo counts PPO iterations
    assert_same_lora(lora_of(run_dir / "final"), lora_of(run_dir_of(straight.stdout) / "final"))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "perf/train_images" in line]
    assert steps == sorted(set(steps)), f"steps logged twice: {steps}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_saved_lora_loads_at_its_trained_strength(script, tiny, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    module = importlib.import_module(Path(script).stem)
    _, _, unet, _ = load_tiny(module, tiny["lcm"])
    module.add_lora(unet, rank=4, alpha=16)  # scale alpha / rank = 4: lost if the file forgets alpha
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    module.save_lora(unet, tmp_path / "lora", module.Args())
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    pipe.load_lora_weights(tmp_path / "lora")
    generator = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    cond = torch.randn(2, unet.config.time_cond_proj_dim, generator=generator)
    with torch.no_grad():
        trained = unet(x, 499, encoder_hidden_states=text, timestep_cond=cond).sample
        loaded = pipe.unet(x, 499, encoder_hidden_states=text, timestep_cond=cond).sample
    assert torch.allclose(trained, loaded, atol=1e-5), (trained - loaded).abs().max()
