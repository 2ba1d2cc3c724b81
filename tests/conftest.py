"""Shared test fixtures: the tiny offline world (built once per session) and a script runner."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs a script end to end; the fast subset is "
                                       "python -m pytest -q -m \"not slow\" tests")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny LCM pipeline, reward models and prompts file (see tests/tiny_world.py)."""
    from tests.tiny_world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def bases(tiny):
    """Paths of the tiny SD1.5 and SDXL bases, their LCM-LoRAs and the UNet-only SDXL LCM (tests/tiny_world.py)."""
    from tests.tiny_world import build_bases

    return build_bases(tiny["lcm"].parent / "bases")


@pytest.fixture(autouse=True)
def keep_the_ctrl_c_handler():
    """A Run made in-process installs its own Ctrl-C handler; pytest's comes back after each test."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process training runs take one intra-op thread: on a shared, loaded CPU two spinning OpenMP
    threads were measured 25x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_script(tmp_path):
    """Run a top-level script as a user would; returns the CompletedProcess (never raises)."""

    def run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / script), "--device", "cpu", "--mixed-precision", "no",
                   "--output-dir", str(tmp_path / "runs"), *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    return run


def tiny_args(tiny, reward: str = "aesthetic", steps: int = 2) -> list[str]:
    """The flags that point a script at the tiny world: model, rewards, prompts, small sizes."""
    reward_path = tiny["aesthetic"] if reward == "aesthetic" else tiny["clip"]
    return ["--model", str(tiny["lcm"]), "--reward", f"{reward}={reward_path}",
            "--eval-rewards", f"clipscore={tiny['clip']}", "--prompts-file", str(tiny["prompts"]),
            "--eval-prompts-file", str(tiny["prompts"]), "--resolution", "32", "--num-inference-steps", "4",
            "--train-steps", str(steps), "--eval-every", "0", "--batch-size", "2"]


# script -> flags that make a short run of it on the tiny world (beyond tiny_args)
SHORT_RUN_FLAGS = {
    "rocm_kl.py": ["--beta", "0.1", "--lr", "1e-2"],
    "rocm_fdiv.py": ["--divergence", "hellinger", "--beta", "0.1", "--lr", "1e-2"],
    "cm_dpo.py": ["--beta", "0.1", "--lr", "1e-2", "--samples-per-prompt", "2"],
    "rlcm_ppo.py": ["--reward", "jpeg_compressibility", "--lr", "1e-2", "--sample-batches", "1",
                    "--train-batch-size", "3", "--grad-accum", "1"],
}


def run_dir_of(output: str) -> Path:
    """The run directory a script announces on stdout ("run directory: DIR")."""
    return Path(next(line.split(": ", 1)[1].split(" (")[0] for line in output.splitlines()
                     if line.startswith("run directory: ")))


def lora_of(directory: Path) -> dict:
    """The LoRA weights saved in directory (final/ or a checkpoint)."""
    from safetensors.torch import load_file

    return load_file(directory / "pytorch_lora_weights.safetensors")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """A script that stopped on a mistake as it should: exit code != 0, no traceback, its last line on stderr
    "error: ..."; returns that line."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


def load_tiny(module, model, dtype=None, **flags) -> tuple:
    """module's own load_lcm on a tiny pipeline at 32 px: (encode, vae, unet, scheduler)."""
    import torch

    args = module.Args(model=str(model), resolution=32, device="cpu", **flags)
    return module.load_lcm(args, torch.device("cpu"), dtype or torch.float32)[:4]


def main_before_models(module, monkeypatch, *argv: str) -> None:
    """module's `python SCRIPT argv` in-process, as far as loading the LCM (which fails the test)."""
    monkeypatch.setattr(module, "load_lcm", lambda *a: pytest.fail("the check came after the models loaded"))
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main(module.cli(module.Args))
