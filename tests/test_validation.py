"""Flags every script shares: impossible values stop with one line naming the flag, before anything loads."""

import importlib
import itertools
import re
import shlex
import subprocess
import typing

import pytest
import torch
import tyro

from tests.conftest import REPO, main_before_models, tiny_args

SCRIPTS = ["rocm_kl", "rocm_fdiv", "rlcm_ppo", "cm_dpo"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags,message", [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0 (got -1.0)"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--log-every", "0"], "--log-every must be > 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--checkpoint-limit", "0"], "--checkpoint-limit must be > 0"),
    (["--eval-samples-per-prompt", "0"], "--eval-samples-per-prompt must be > 0 (got 0)"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be > 0 (got 0)"),  # before, step 1 stopped the run
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--device", "foo"], "--device must be cuda or cpu (got foo)"),  # before, a traceback
    (["--exp-name", "../x"], "--exp-name '../x' must be a plain name"),  # before, written outside --output-dir
    (["--exp-name", "/tmp/x"], "--exp-name '/tmp/x' must be a plain name"),
    (["--exp-name", ".."], "--exp-name '..' must be a plain name"),
])
def test_impossible_shared_flags_are_one_line_errors(script, flags, message):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}"):
        module.validate(tyro.cli(module.Args, args=["--device", "cpu", *flags]))


@pytest.mark.parametrize("script,flags,message", [
    *[(script, ["--num-inference-steps", "51"], "--num-inference-steps must be <= 50, the steps this LCM was "
       "distilled on (got 51)") for script in SCRIPTS],
    ("rocm_kl", ["--resolution", "31"], "--resolution must be a multiple of 2 (got 31)"),
])
def test_flags_the_loaded_lcm_cannot_take_are_one_line_errors(tiny, script, flags, message, tmp_path,
                                                              one_torch_thread):
    module = importlib.import_module(script)
    args = tyro.cli(module.Args, args=[*tiny_args(tiny), "--eval-rewards", "--device", "cpu", "--mixed-precision", "no",
                                       "--output-dir", str(tmp_path / "runs"), *flags])
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        module.main(args)


def test_cm_dpo_rejects_a_negative_last_step_budget():
    cm_dpo = importlib.import_module("cm_dpo")
    with pytest.raises(SystemExit, match="^error: --last-step-budget must be >= 0"):
        cm_dpo.validate(tyro.cli(cm_dpo.Args, args=["--device", "cpu", "--last-step-budget", "-1"]))


def bad_input(script: str, case: str, tmp_path) -> tuple[list[str], str]:
    """(flags, the error line's message) of a mistake researchers make."""
    beta = "--clip-range" if script == "rlcm_ppo" else "--beta"  # rlcm_ppo has no beta; another float flag
    return {
        "lr nan": (["--lr", "nan"], "--lr must be a finite number (got nan)"),
        "beta inf": ([beta, "inf"], f"{beta} must be a finite number (got inf)"),
        "seed -1": (["--seed", "-1"], "--seed must be in [0, 2**32) (got -1)"),
        "guidance below 1": (["--guidance-scale", "0.5"], "--guidance-scale must be >= 1 (got 0.5): w = scale - 1"),
        "missing model directory": (["--model", str(tmp_path / "no_such_lcm")],
                                    f"--model '{tmp_path / 'no_such_lcm'}' is not a directory; pass a pipeline "
                                    "directory or a hub id (org/name)"),
        "missing reward directory": (["--reward", "aesthetic=./no_such_clip"],
                                     "the reward directory './no_such_clip' does not exist; fix NAME=DIR or pass "
                                     "NAME alone"),
        "missing eval reward directory": (["--eval-rewards", "clipscore", f"pickscore={tmp_path}/a/b"],
                                          f"the reward directory '{tmp_path}/a/b' does not exist"),
        "unknown reward": (["--reward", "pickscor"], "unknown reward 'pickscor'; choose one of: pickscore,"),
        "unknown eval reward": (["--eval-rewards", "clipscore", "hps"], "unknown reward 'hps'; choose one of: "),
        "missing resume directory": (["--resume", str(tmp_path / "no_such_run")],
                                     f"no checkpoint in '{tmp_path / 'no_such_run'}'"),
    }[case]


CASES = ["lr nan", "beta inf", "seed -1", "guidance below 1", "missing model directory", "missing reward directory",
         "missing eval reward directory", "unknown reward", "unknown eval reward", "missing resume directory"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_before_the_models_load(script, case, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    flags, message = bad_input(script, case, tmp_path)
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}"):
        main_before_models(module, monkeypatch, "--device", "cpu", "--output-dir", str(tmp_path / "runs"), *flags)
    assert not (tmp_path / "runs").exists()


def test_bad_input_is_one_line_on_stderr(run_script, tmp_path):
    """As a user sees it: exit code 1, the one line, no traceback (SystemExit in-process above, the script here)."""
    for case in ("lr nan", "missing model directory"):
        flags, message = bad_input("rocm_kl", case, tmp_path)
        result = run_script("rocm_kl.py", *flags)
        assert result.returncode == 1 and result.stderr.strip() == f"error: {message}", result.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_float_flag_refuses_nan_and_inf(script):
    module = importlib.import_module(script)
    floats = [name for name, hint in typing.get_type_hints(module.Args).items() if hint is float]
    assert {"lr", "guidance_scale", "max_grad_norm"} <= set(floats)
    for name, value in itertools.product(floats, ["nan", "inf", "-inf"]):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit, match=f"^error: {flag} must be a finite number"):
            module.validate(tyro.cli(module.Args, args=["--device", "cpu", flag, value]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_seeds_outside_0_to_2_32_are_refused_and_org_name_stays_a_hub_id(script):
    module = importlib.import_module(script)
    for seed in ["-1", str(2**32), str(2**64)]:
        with pytest.raises(SystemExit, match=r"^error: --seed must be in \[0, 2\*\*32\)"):
            module.validate(tyro.cli(module.Args, args=["--device", "cpu", "--seed", seed]))
    # the largest seed, a guidance scale of exactly 1 (w = 0) and hub ids (org/name) pass
    module.validate(tyro.cli(module.Args, args=["--device", "cpu", "--seed", str(2**32 - 1), "--guidance-scale", "1",
                                                "--model", "someone/some-lcm", "--reward", "aesthetic=someone/clip"]))


def test_an_evaluation_reward_that_cannot_load_is_a_one_line_error():
    """Before, it was skipped with a warning, and the run's evaluations silently lacked its column."""
    rocm_kl = importlib.import_module("rocm_kl")
    with pytest.raises(SystemExit, match=r"^error: could not load the reward 'aesthetic=/nonexistent/weights' \(.*"
                                         r"\); fix"):
        rocm_kl.load_eval_rewards(["aesthetic=/nonexistent/weights"], torch.float32)


def test_the_readmes_cpu_command_of_every_script_parses_and_validates():
    """The commands the scripts' docstrings point to: bash expands them (echo for python), each script's own
    parser and checks take their flags, and their directories exist."""
    block = (REPO / "README.md").read_text().split("## Each script on the CPU")[1].split("```bash\n")[1].split("```")[0]
    expanded = subprocess.run(["bash", "-c", block.replace("python ", "echo ")], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in expanded] == [f"{script}.py" for script in SCRIPTS]
    for line in expanded:
        script, *flags = shlex.split(line)
        module = importlib.import_module(script.removesuffix(".py"))
        module.validate(tyro.cli(module.Args, args=flags))


@pytest.mark.parametrize("script", ["rocm_kl", "rocm_fdiv"])
def test_rocm_refuses_a_reward_without_a_gradient_before_any_model_loads(script, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match="^error: reward 'jpeg_compressibility' has no gradient; ROCM needs a "
                                         r"differentiable reward \(.*\) or use rlcm_ppo.py$"):
        main_before_models(module, monkeypatch, "--device", "cpu", "--output-dir", str(tmp_path),
                           "--reward", "jpeg_compressibility")
