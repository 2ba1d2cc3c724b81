"""Flags every script shares: impossible values stop with one line naming the flag, before training."""

import importlib

import pytest
import tyro

from tests.conftest import tiny_args

SCRIPTS = ["rocm_kl", "rocm_fdiv", "rlcm_ppo", "cm_dpo"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags,message", [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
])
def test_impossible_shared_flags_are_one_line_errors(script, flags, message):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        module.validate(tyro.cli(module.Args, args=["--device", "cpu", *flags]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_more_steps_than_the_lcm_was_distilled_on_is_a_one_line_error(tiny, script, one_torch_thread):
    module = importlib.import_module(script)
    args = tyro.cli(module.Args, args=[*tiny_args(tiny), "--eval-rewards", "--device", "cpu", "--mixed-precision", "no",
                                       "--num-inference-steps", "51"])
    with pytest.raises(SystemExit, match=r"^error: --num-inference-steps must be <= 50, the steps this LCM was distilled on"):
        module.main(args)


def test_cm_dpo_rejects_a_negative_last_step_budget():
    cm_dpo = importlib.import_module("cm_dpo")
    with pytest.raises(SystemExit, match="^error: --last-step-budget must be >= 0"):
        cm_dpo.validate(tyro.cli(cm_dpo.Args, args=["--device", "cpu", "--last-step-budget", "-1"]))
