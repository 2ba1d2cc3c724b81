"""Shared test fixtures: the tiny offline world (built once per session) and a script runner."""

import os
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


def run_dir_of(output: str) -> Path:
    """The run directory a script announces on stdout ("run directory: DIR")."""
    return Path(next(line.split(": ", 1)[1].split(" (")[0] for line in output.splitlines()
                     if line.startswith("run directory: ")))
