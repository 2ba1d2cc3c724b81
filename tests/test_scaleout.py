"""Issue 8 for every script: torchrun over 2 gloo ranks, exact resume after a kill, checkpoint hygiene.

Each script takes the same flags (--save-every, --resume, --checkpoint-limit, --max-nonfinite-steps),
prints "run directory: DIR", writes DIR/checkpoints/step_N/training_state.pt and DIR/final.
"""

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_dir_of, tiny_args

# script -> flags that make a short run of it on the tiny world (beyond tiny_args)
SCRIPTS = {
    "rocm_kl.py": ["--beta", "0.1", "--lr", "1e-2"],
    "rocm_fdiv.py": ["--divergence", "hellinger", "--beta", "0.1", "--lr", "1e-2"],
    "cm_dpo.py": ["--beta", "0.1", "--lr", "1e-2", "--samples-per-prompt", "2"],
    "rlcm_ppo.py": ["--reward", "jpeg_compressibility", "--lr", "1e-2", "--sample-batches", "1",
                    "--train-batch-size", "3", "--grad-accum", "1"],
}
# scripts whose update on N ranks x batch b equals one process with batch N*b (not PPO: each rank
# shuffles its own samples into minibatches)
SAME_AS_ONE_PROCESS = ["rocm_kl.py", "rocm_fdiv.py", "cm_dpo.py"]


def lora(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run_dir / name / "pytorch_lora_weights.safetensors")


def assert_same_lora(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"LoRA weights differ by {worst}"


def assert_same_updates(a: dict, b: dict) -> None:
    """Equal up to float reduction order. Adam divides by |g| + 1e-8, so float noise in small gradients is
    amplified (on some CPUs a quarter of the weights differ by 1e-7 and 5% by 1e-6 after two steps), and
    the rare gradients near zero move by up to lr; a wrong batch split moves nearly every weight by about
    lr (1e-2 here), so a weight counts as differing above 1% of lr."""
    assert a.keys() == b.keys()
    differing = torch.cat([((a[k] - b[k]).abs() > 1e-4).flatten() for k in a]).float().mean().item()
    assert differing < 0.01, f"{differing:.1%} of the LoRA weights differ"


def script_command(script: str, tiny, tmp_path: Path, *flags: str, steps: int, torchrun: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return [*launcher, str(REPO / script), *tiny_args(tiny, steps=steps), *SCRIPTS[script], "--eval-rewards",
            "--device", "cpu", "--mixed-precision", "no", "--output-dir", str(tmp_path / "runs"), *flags]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_stay_identical_and_match_one_process(script, tiny, tmp_path):
    two = run(script_command(script, tiny, tmp_path, "--batch-size", "1", steps=2, torchrun=2), tmp_path)
    assert "LoRA weights identical on all 2 ranks" in two.stdout
    effective = next(line for line in two.stdout.splitlines() if line.startswith("effective batch: "))
    assert "x 2 ranks = 2 " in effective, effective
    if script in SAME_AS_ONE_PROCESS:
        one = run(script_command(script, tiny, tmp_path, "--batch-size", "2", steps=2), tmp_path)
        assert_same_updates(lora(run_dir_of(two.stdout)), lora(run_dir_of(one.stdout)))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_with_accumulation_match_one_process(script, tiny, tmp_path):
    if script not in SAME_AS_ONE_PROCESS:
        pytest.skip(f"{script}'s update depends on the per-rank batch")
    two = run(script_command(script, tiny, tmp_path, "--batch-size", "1", "--grad-accum", "2", steps=1, torchrun=2),
              tmp_path)
    one = run(script_command(script, tiny, tmp_path, "--batch-size", "2", "--grad-accum", "2", steps=1), tmp_path)
    # a rank's micro-batch m holds the global samples m*2b + rank*b ...: 2 ranks x b=1 x 2 micro = 1 x b=2 x 2 micro
    assert_same_updates(lora(run_dir_of(two.stdout)), lora(run_dir_of(one.stdout)))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_kill_continues_exactly(script, tiny, tmp_path):
    straight = run(script_command(script, tiny, tmp_path, "--save-every", "2", steps=6), tmp_path)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(script_command(script, tiny, tmp_path / "killed", "--save-every", "2", steps=6),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while time.time() < deadline and not list((tmp_path / "killed").glob("runs/*/checkpoints/step_000002/training_state.pt")):
        assert killed.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    run_dir = next((tmp_path / "killed" / "runs").iterdir())
    assert not (run_dir / "final").exists()

    resumed = run(script_command(script, tiny, tmp_path, "--save-every", "2", "--resume", str(run_dir), steps=6),
                  tmp_path)
    assert re.search(r"resumed at (step|iteration) ", resumed.stdout)  # rlcm_ppo counts PPO iterations
    assert_same_lora(lora(run_dir), lora(run_dir_of(straight.stdout)))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_limit_and_half_written_checkpoints(script, tiny, tmp_path):
    result = run(script_command(script, tiny, tmp_path, "--save-every", "1", "--checkpoint-limit", "2", steps=3),
                 tmp_path)
    run_dir = run_dir_of(result.stdout)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    # what a kill during saving leaves behind is never taken for the latest checkpoint
    half_written = run_dir / "checkpoints" / "step_000009.tmp"
    half_written.mkdir()
    (half_written / "training_state.pt").write_bytes(b"truncated")
    resumed = run(script_command(script, tiny, tmp_path, "--resume", str(run_dir), steps=4), tmp_path)
    assert re.search(r"resumed at (step|iteration) 3\b", resumed.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_interrupted_save_keeps_the_previous_lora(script, tmp_path, monkeypatch):
    module = importlib.import_module(Path(script).stem)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    module.add_lora(unet, rank=2, alpha=2)
    target = tmp_path / "lora"
    module.save_lora(unet, target, training_state={"step": 1})
    before = load_file(target / "pytorch_lora_weights.safetensors")

    def killed_while_writing(*args, **kwargs):
        raise KeyboardInterrupt

    with torch.no_grad():
        for param in unet.parameters():
            if param.requires_grad:
                param.add_(1.0)
    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        module.save_lora(unet, target, training_state={"step": 2})
    assert_same_lora(load_file(target / "pytorch_lora_weights.safetensors"), before)
    monkeypatch.undo()
    assert torch.load(target / "training_state.pt")["step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_updates_are_skipped_then_stop_with_a_checkpoint(script, tiny, tmp_path):
    command = script_command(script, tiny, tmp_path, "--lr", "1e30", "--max-nonfinite-steps", "2", "--save-every",
                             "100", steps=20)
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: 2 non-finite steps in a row"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    run_dir = run_dir_of(result.stdout)
    assert "update skipped (1 in a row)" in result.stdout
    checkpoints = list((run_dir / "checkpoints").glob("step_*/training_state.pt"))
    assert len(checkpoints) == 1
    assert all(torch.isfinite(value).all() for value in lora(checkpoints[0].parent, ".").values())


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_saved_lora_loads_at_its_trained_strength(script, tiny, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    module = importlib.import_module(Path(script).stem)
    _, _, _, unet, _ = module.load_lcm(str(tiny["lcm"]), torch.device("cpu"), torch.float32)
    module.add_lora(unet, rank=4, alpha=16)  # scale alpha / rank = 4: lost if the file forgets alpha
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    module.save_lora(unet, tmp_path / "lora")
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    pipe.load_lora_weights(tmp_path / "lora")
    generator = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    cond = torch.randn(2, unet.config.time_cond_proj_dim, generator=generator)
    with torch.no_grad():
        trained = unet(x, 499, encoder_hidden_states=text, timestep_cond=cond).sample
        loaded = pipe.unet(x, 499, encoder_hidden_states=text, timestep_cond=cond).sample
    assert torch.allclose(trained, loaded, atol=1e-5), (trained - loaded).abs().max()
