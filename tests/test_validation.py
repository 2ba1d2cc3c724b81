"""Flags every script shares: impossible values stop with one line naming the flag, before training."""

import importlib
import itertools
import re
import shlex
import subprocess
import typing

import pytest
import torch
import tyro

from tests.conftest import REPO, tiny_args

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


def assert_one_line_error(result, flag):
    """Exit code != 0, and stderr is one line, "error: ...", naming the flag; no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["lr nan", "beta inf", "seed -1", "guidance below 1", "missing model directory",
                                  "missing reward directory", "missing eval reward directory", "binary prompts file"])
def test_bad_input_stops_with_one_early_line(script, case, run_script, tmp_path):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    beta = "--clip-range" if script == "rlcm_ppo" else "--beta"  # rlcm_ppo has no beta; another float flag
    flags, flag, message = {
        "lr nan": (["--lr", "nan"], "--lr", "--lr must be a finite number (got nan)"),
        "beta inf": ([beta, "inf"], beta, f"{beta} must be a finite number (got inf)"),
        "seed -1": (["--seed", "-1"], "--seed", "--seed must be in [0, 2**32) (got -1)"),
        "guidance below 1": (["--guidance-scale", "0.5"], "--guidance-scale", "w = guidance_scale - 1"),
        "missing model directory": (["--model", str(tmp_path / "no_such_lcm")], "--model",
                                    f"--model directory '{tmp_path / 'no_such_lcm'}' does not exist"),
        "missing reward directory": (["--reward", "aesthetic=./no_such_clip"], "--reward",
                                     "--reward directory './no_such_clip' does not exist"),
        "missing eval reward directory": (["--eval-rewards", "clipscore", f"pickscore={tmp_path}/a/b"],
                                          "--eval-rewards", f"--eval-rewards directory '{tmp_path}/a/b' does not exist"),
        "binary prompts file": (["--prompts-file", str(binary)], "--prompts-file", "is not UTF-8 text"),
    }[case]
    line = assert_one_line_error(run_script(f"{script}.py", *flags), flag)
    assert message in line and "Repo id" not in line


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


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b"a cat\x00\x00\x00\n"])
def test_a_binary_eval_prompts_file_is_one_line_naming_its_flag(script, content, tmp_path):
    module = importlib.import_module(script)
    binary = tmp_path / "eval.bin"
    binary.write_bytes(content)
    args = tyro.cli(module.Args, args=["--device", "cpu", "--eval-prompts-file", str(binary)])
    with pytest.raises(SystemExit, match=f"^error: --eval-prompts-file '{binary}' is (not UTF-8 text|a binary file)"):
        module.main(args)


@pytest.mark.parametrize("script", SCRIPTS)
def test_prompts_cut_at_the_token_limit_give_one_warning(tiny, script, one_torch_thread, tmp_path, capsys):
    module = importlib.import_module(script)
    long_prompt = "a very long prompt about " + "many red apples and " * 6
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat\n{long_prompt}1\n{long_prompt}2\n{long_prompt}1\n")
    args = tyro.cli(module.Args, args=[*tiny_args(tiny, steps=1), "--eval-rewards", "--device", "cpu",
                                       "--mixed-precision", "no", "--prompts-file", str(prompts), "--eval-prompts-file",
                                       str(prompts), "--output-dir", str(tmp_path / "runs"), "--batch-size", "1",
                                       "--sample-batches" if script == "rlcm_ppo" else "--grad-accum", "1",
                                       *(["--train-batch-size", "3"] if script == "rlcm_ppo" else [])])
    module.main(args)
    output = capsys.readouterr()
    warnings = [line for line in (output.out + output.err).splitlines() if "longer than the text encoder" in line]
    assert warnings == [f"warning: 2 of 3 prompts are longer than the text encoder's limit of 77 tokens and are cut "
                        f"to it, e.g. '{long_prompt[:50]}...'; shorten them"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_evaluation_reward_that_cannot_load_is_skipped_but_an_unknown_one_stops(script, capsys):
    """Missing weights (or a missing package) cost the run one evaluation column, with a warning; a misspelt
    name is a one-line error, not a silently missing column."""
    module = importlib.import_module(script)
    assert module.load_eval_rewards(["aesthetic=/nonexistent/weights"], torch.float32) == {}
    assert "warning: skipping evaluation reward: could not load reward 'aesthetic'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="^error: unknown reward 'pickscor'"):
        module.load_eval_rewards(["pickscor"], torch.float32)


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_reward_names_are_checked_before_any_model_loads(script, monkeypatch):
    """A misspelt reward, or (ROCM) one without a gradient, stops in a line before the LCM loads, not minutes later."""
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "load_lcm", lambda *a: pytest.fail("the check came after the models loaded"))
    cases = [(["--reward", "pickscor"], "unknown reward 'pickscor' in --reward; choose one of: pickscore,"),
             (["--eval-rewards", "clipscore", "hps"], "unknown reward 'hps' in --eval-rewards")]
    if script.startswith("rocm"):
        cases.append((["--reward", "jpeg_compressibility"], "reward 'jpeg_compressibility' has no gradient; ROCM needs "
                      "a differentiable reward (pickscore, hpsv2, clipscore, aesthetic) or use rlcm_ppo.py"))
    for flags, message in cases:
        with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}"):
            module.main(tyro.cli(module.Args, args=["--device", "cpu", *flags]))
