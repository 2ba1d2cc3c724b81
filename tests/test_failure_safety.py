"""Failure safety of a run, in the infrastructure the four scripts share as byte-identical copies (test_layout.py),
exercised through rocm_kl: non-finite updates, resume (its defaults, its refusals, where it continues), saving
checkpoints and the final LoRA, Ctrl-C and out of memory. The fast tests drive Run in-process on a small UNet, as
main drives it, without loading an LCM; the slow ones train the tiny world."""

import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import tyro

import rocm_kl
from tests.conftest import REPO, lora_of, main_before_models, one_line_error, run_dir_of, tiny_args

NONFINITE_FIX = "lower --lr or use --mixed-precision bf16/no"


@pytest.fixture
def small_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    rocm_kl.add_lora(unet, rank=2, alpha=2)
    return unet


def lora_params(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def cpu_args(tmp_path: Path, **flags) -> rocm_kl.Args:
    return rocm_kl.Args(**{"device": "cpu", "mixed_precision": "no", "output_dir": str(tmp_path / "runs"), **flags})


def begun(args: rocm_kl.Args, unet) -> rocm_kl.Run:
    """A Run begun on unet as main begins it (a fresh optimizer; on resume, the checkpoint's state restored)."""
    run = rocm_kl.Run(args)
    run.begin(unet, torch.optim.AdamW(lora_params(unet), lr=args.lr), unet, "a test batch")
    return run


def train(run: rocm_kl.Run, unet, steps) -> None:
    """Steps with a finite loss, as main takes them: update, log, save when one is due."""
    for step in steps:
        sum(p.square().sum() for p in lora_params(unet)).backward()
        assert run.update(step, True, lora_params(unet), 1.0) is not None
        run.log({"train/loss": 1.0}, step)
        run.save(step)


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def strict_json_lines(path: Path) -> list[dict]:
    """metrics.jsonl as JSON (which has no NaN or Infinity: json.loads alone would take them)."""
    def refuse(constant):
        raise AssertionError(f"{path} holds a bare {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def training_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in strict_json_lines(run_dir / "metrics.jsonl") if "train/loss" in record]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- non-finite updates -----------------------------------------------------------------------------------------

def test_non_finite_updates_are_skipped_then_stop_naming_the_newest_finite_checkpoint(tmp_path, small_unet, capsys):
    run = begun(cpu_args(tmp_path, save_every=1, max_nonfinite_steps=2), small_unet)
    train(run, small_unet, [1])
    with torch.no_grad():  # step 2's update broke the weights, and its checkpoint holds them
        lora_params(small_unet)[0].fill_(float("nan"))
    run.save(2)
    before = [p.detach().clone() for p in lora_params(small_unet)]
    sum(p.square().sum() for p in lora_params(small_unet)[1:]).backward()  # a finite gradient, a non-finite loss
    assert run.update(3, False, lora_params(small_unet), 1.0) is None
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(before, lora_params(small_unet)))
    run.save(3)  # never after a non-finite loss
    assert checkpoint_names(run.run_dir) == ["step_000001", "step_000002"]
    assert "warning: step 3: non-finite loss or gradient, update skipped" in capsys.readouterr().out
    newest_finite = run.run_dir / "checkpoints" / "step_000001"  # step 2's holds non-finite weights
    with pytest.raises(SystemExit, match=f"^error: 2 non-finite steps in a row.*; {NONFINITE_FIX}, then --resume "
                                         f"{re.escape(str(newest_finite))}$"):
        run.update(4, False, lora_params(small_unet), 1.0)


def test_a_finite_update_ends_a_streak_and_without_checkpoints_the_stop_says_so(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path, max_nonfinite_steps=2), small_unet)
    params = lora_params(small_unet)
    assert run.update(1, False, params, 1.0) is None
    train(run, small_unet, [2])
    assert run.update(3, False, params, 1.0) is None
    with pytest.raises(SystemExit, match=f"^error: 2 non-finite steps in a row.*; {NONFINITE_FIX}, no checkpoint "
                                         "has finite weights$"):
        run.update(4, False, params, 1.0)


def test_non_finite_final_weights_are_not_saved(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path, save_every=1), small_unet)
    train(run, small_unet, [1])
    with torch.no_grad():
        lora_params(small_unet)[-1].fill_(float("inf"))
    with pytest.raises(SystemExit, match="^error: .*not finite, so final/ is not written; "
                                         f"{NONFINITE_FIX}, then --resume "
                                         f"{re.escape(str(run.run_dir / 'checkpoints' / 'step_000001'))}$"):
        run.finish(lora_params(small_unet), lambda: pytest.fail("non-finite weights were evaluated"))
    assert not (run.run_dir / "final").exists() and not (run.run_dir / "final.tmp").exists()


def test_non_finite_metrics_are_written_as_json_null(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path), small_unet)
    run.log({"train/loss": float("nan"), "train/kl": float("-inf"), "train/reward": 0.5}, 1)
    assert strict_json_lines(run.run_dir / "metrics.jsonl") == [
        {"step": 1, "train/loss": None, "train/kl": None, "train/reward": 0.5}]


# --- resume: the run's own flags, and what it refuses ------------------------------------------------------------

def cli_of(monkeypatch, *argv: str) -> rocm_kl.Args:
    """The flags of `python rocm_kl.py argv`."""
    monkeypatch.setattr(sys, "argv", ["rocm_kl.py", *argv])
    return rocm_kl.cli(rocm_kl.Args)


def test_resume_takes_the_newest_checkpoints_flags_and_typed_flags_override(tmp_path, small_unet, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    first = cpu_args(tmp_path, lr=1e-3, prompts_file=str(prompts), eval_rewards=("clipscore",), save_every=1,
                     train_steps=2)
    run = begun(first, small_unet)
    train(run, small_unet, [1, 2])
    checkpoints = run.run_dir / "checkpoints"
    # every flag the run started with, not the defaults (before, --lr fell back to 6e-05 and --prompts-file to None)
    assert cli_of(monkeypatch, "--resume", str(run.run_dir)) == dataclasses.replace(first, resume=str(run.run_dir))
    # a resume that changed --lr: its checkpoints carry the new value, the older checkpoint its own
    second = dataclasses.replace(first, resume=str(run.run_dir), lr=2e-3, train_steps=3)
    train(begun(second, small_unet), small_unet, [3])
    assert cli_of(monkeypatch, "--resume", str(run.run_dir)) == second
    assert cli_of(monkeypatch, f"--resume={checkpoints / 'step_000002'}").lr == 1e-3
    typed = cli_of(monkeypatch, "--resume", str(run.run_dir), "--lr", "5e-4", "--train-steps", "9")
    assert typed == dataclasses.replace(second, lr=5e-4, train_steps=9)


@pytest.fixture
def saved_run(tmp_path, small_unet) -> Path:
    """A run directory with the checkpoints of steps 1 and 2 (--batch-size 1, --seed 0, --lora-rank 16)."""
    run = begun(cpu_args(tmp_path, save_every=1, train_steps=2), small_unet)
    train(run, small_unet, [1, 2])
    return run.run_dir


@pytest.mark.parametrize("flags,message", [
    (["--seed", "3"], "--seed 0, this run has 3"),
    (["--lora-rank", "8"], "--lora-rank 16, this run has 8"),
    (["--batch-size", "2"], "--batch-size x ranks 1, this run has 2"),
])
def test_resume_refuses_changed_run_defining_flags(saved_run, flags, message, monkeypatch):
    checkpoint = saved_run / "checkpoints" / "step_000002"
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(checkpoint))}' was trained with "
                                         f"{re.escape(message)}; resume with the same value or start a new run$"):
        main_before_models(rocm_kl, monkeypatch, "--resume", str(saved_run), "--train-steps", "3", *flags)


@pytest.mark.parametrize("train_steps", [[], ["--train-steps", "1"]])
def test_resume_refuses_train_steps_at_or_below_the_checkpoint(saved_run, train_steps, monkeypatch):
    """Before, it trained nothing and rewrote final/ with a false model card."""
    checkpoint = saved_run / "checkpoints" / "step_000002"
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(checkpoint))}' is at 2; pass a --train-steps "
                                         "above it"):
        main_before_models(rocm_kl, monkeypatch, "--resume", str(saved_run), *train_steps)
    assert checkpoint_names(saved_run) == ["step_000001", "step_000002"] and not (saved_run / "final").exists()


@pytest.mark.parametrize("script", ["rocm_fdiv", "rlcm_ppo", "cm_dpo"])
def test_resume_refuses_a_checkpoint_of_another_script(script, saved_run, monkeypatch):
    module = importlib.import_module(script)
    checkpoint = saved_run / "checkpoints" / "step_000002"
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(checkpoint))}' was written by rocm_kl.py; "
                                         "resume it with rocm_kl.py$"):
        main_before_models(module, monkeypatch, "--resume", str(saved_run), "--train-steps", "3")


def test_only_a_runs_newest_checkpoint_continues_in_its_directory(tmp_path, saved_run):
    """An older checkpoint, or one outside a run's checkpoints/ (here best/), starts a new run under --output-dir
    that records where it came from (before, best/'s parent was taken for its run and overwritten)."""
    checkpoints = saved_run / "checkpoints"
    best = tmp_path / "best" / "step_000002"
    shutil.copytree(checkpoints / "step_000002", best)
    (checkpoints / "step_000009.tmp").mkdir()  # what a kill during a save leaves: never taken for a checkpoint
    (checkpoints / "step_000009.tmp" / "training_state.pt").write_bytes(b"partial")
    for resume in (saved_run, checkpoints / "step_000002"):
        run = rocm_kl.Run(cpu_args(tmp_path, resume=str(resume), train_steps=3))
        assert run.run_dir == saved_run and run.resumed["step"] == 2
    for resume in (checkpoints / "step_000001", best):
        run = rocm_kl.Run(cpu_args(tmp_path, output_dir=str(tmp_path / "elsewhere"), resume=str(resume),
                                   train_steps=3))
        assert run.run_dir.parent == tmp_path / "elsewhere"
        recorded = json.loads((run.run_dir / "args.json").read_text())["resumed_from"]
        assert recorded == str(resume), recorded[:200]


def test_resuming_in_place_drops_the_metrics_past_the_checkpoint(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path, save_every=2, train_steps=3), small_unet)
    train(run, small_unet, [1, 2, 3])  # killed after step 3 was logged, before its checkpoint
    assert checkpoint_names(run.run_dir) == ["step_000002"]
    resumed = begun(cpu_args(tmp_path, resume=str(run.run_dir), save_every=2, train_steps=4), small_unet)
    assert training_steps(run.run_dir) == [1, 2]
    train(resumed, small_unet, [3, 4])
    assert training_steps(run.run_dir) == [1, 2, 3, 4]


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    first = rocm_kl.Run(cpu_args(tmp_path)).run_dir
    second = rocm_kl.Run(cpu_args(tmp_path)).run_dir
    assert first != second and first.is_dir() and second.is_dir()


# --- saving -------------------------------------------------------------------------------------------------------

def test_a_save_interrupted_by_a_kill_does_not_block_the_next(tmp_path, small_unet):
    """A kill during a save leaves NAME.tmp behind; the next save of that name writes over it."""
    run = begun(cpu_args(tmp_path, save_every=1), small_unet)
    train(run, small_unet, [1])
    checkpoints = run.run_dir / "checkpoints"
    leftover = checkpoints / "step_000002.tmp"
    leftover.mkdir()
    (leftover / "training_state.pt").write_bytes(b"partial")
    train(run, small_unet, [2])
    assert checkpoint_names(run.run_dir) == ["step_000001", "step_000002"]
    assert torch.load(checkpoints / "step_000002" / "training_state.pt", weights_only=True)["step"] == 2


def test_an_interrupted_save_keeps_the_previous_lora(tmp_path, small_unet, monkeypatch):
    """A save writes NAME.tmp and renames it NAME: a kill while writing leaves the previous NAME whole."""
    args = cpu_args(tmp_path)
    target = tmp_path / "lora"
    rocm_kl.save_lora(small_unet, target, args, training_state={"step": 1})
    before = lora_of(target)
    with torch.no_grad():
        for param in lora_params(small_unet):
            param.add_(1.0)

    def killed_while_writing(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            rocm_kl.save_lora(small_unet, target, args, training_state={"step": 2})
    after = lora_of(target)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.load(target / "training_state.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no lora.tmp


def test_checkpoint_limit_keeps_the_newest(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path, save_every=1, checkpoint_limit=2), small_unet)
    train(run, small_unet, [1, 2, 3])
    assert checkpoint_names(run.run_dir) == ["step_000002", "step_000003"]


# --- Ctrl-C, out of memory ----------------------------------------------------------------------------------------

def assert_interrupted_line(line: str, run_dir: Path) -> None:
    """The line Ctrl-C prints: the newest checkpoint, and the command that continues the run."""
    newest = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))[-1]
    assert line.startswith(f"interrupted; the newest checkpoint is {newest}; ") and \
        line.endswith(f": python rocm_kl.py --resume {run_dir}"), line


def ctrl_c() -> str:
    """What this process's Ctrl-C handler ends it with."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs at the next bytecode
    except SystemExit as stop:
        return str(stop)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C gave a KeyboardInterrupt (a traceback)")
    pytest.fail("Ctrl-C did not stop the run")


def test_ctrl_c_is_one_line_naming_the_newest_checkpoint_and_the_command(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path, save_every=1), small_unet)
    assert re.fullmatch(r"interrupted; no checkpoint was saved.*", ctrl_c())
    train(run, small_unet, [1, 2])
    assert_interrupted_line(ctrl_c(), run.run_dir)


def test_out_of_memory_is_one_line_naming_the_fix(tmp_path, small_unet):
    run = begun(cpu_args(tmp_path), small_unet)
    with pytest.raises(SystemExit, match=f"^error: out of memory at step 3; {re.escape(rocm_kl.OOM_FIX)}$"):
        with run.backward_pass(small_unet, 3):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


# --- end to end, on the tiny world ------------------------------------------------------------------------------

def rocm_kl_run(cwd: Path, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python rocm_kl.py flags` with only the flags given (a resume takes the rest from its checkpoint)."""
    return subprocess.run([sys.executable, str(REPO / "rocm_kl.py"), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def tiny_run_flags(tiny, tmp_path: Path, steps: int) -> list[str]:
    return [*tiny_args(tiny, steps=steps), "--device", "cpu", "--mixed-precision", "no", "--output-dir",
            str(tmp_path / "runs")]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    """A rocm_kl run of 4 steps at --lr 1e-2, saving every step, keeping 2 checkpoints (steps 3 and 4)."""
    out = tmp_path_factory.mktemp("trained")
    result = rocm_kl_run(out, *tiny_run_flags(tiny, out, 4), "--lr", "1e-2", "--save-every", "1",
                         "--checkpoint-limit", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(result.stdout)
    assert checkpoint_names(run_dir) == ["step_000003", "step_000004"]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "runs" / trained.name))


@pytest.mark.slow
def test_a_non_finite_streak_stops_the_script_naming_the_checkpoint_to_resume(tmp_path, run_copy):
    before = digest(run_copy)
    result = rocm_kl_run(tmp_path, "--resume", str(run_copy), "--train-steps", "20", "--lr", "1e10",
                         "--max-nonfinite-steps", "2", "--save-every", "100")
    # step 5 (from step 4's weights, at the typed --lr) had a finite loss; its update broke the weights
    line = one_line_error(result)
    assert line.startswith("error: 2 non-finite steps in a row") and line.endswith(
        f"; {NONFINITE_FIX}, then --resume {run_copy / 'checkpoints' / 'step_000004'}"), line
    assert "step 5/20 " in result.stdout and "warning: step 6: non-finite loss or gradient, update skipped" in \
        result.stdout and "warning: step 7: non-finite loss or gradient, update skipped" in result.stdout
    after = digest(run_copy)
    del before["metrics.jsonl"], after["metrics.jsonl"]
    assert after == before  # no checkpoint saved or pruned, final/ kept


@pytest.mark.slow
def test_resuming_a_run_keeps_its_flags_and_logs_each_step_once(tiny, tmp_path, run_copy):
    """The newest checkpoint (step 4) is gone: steps 4 and later, already in metrics.jsonl, run again."""
    shutil.rmtree(run_copy / "checkpoints" / "step_000004")
    result = rocm_kl_run(tmp_path, "--resume", str(run_copy), "--train-steps", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {run_copy} (resumed at step 3)" in result.stdout
    assert training_steps(run_copy) == [1, 2, 3, 4, 5]
    assert checkpoint_names(run_copy) == ["step_000004", "step_000005"]  # --save-every 1, --checkpoint-limit 2
    newest = run_copy / "checkpoints" / "step_000005"
    flags = json.loads((newest / "args.json").read_text())
    assert flags["lr"] == 1e-2 and flags["prompts_file"] == str(tiny["prompts"]) and flags["train_steps"] == 5
    state = torch.load(newest / "training_state.pt", weights_only=True)
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [1e-2]
    assert json.loads((run_copy / "final" / "args.json").read_text())["train_steps"] == 5


@pytest.mark.slow
def test_resuming_an_older_checkpoint_trains_exactly_in_a_new_run(tmp_path, run_copy, trained):
    before = digest(run_copy)
    older = run_copy / "checkpoints" / "step_000003"
    result = rocm_kl_run(tmp_path, "--resume", str(older), "--output-dir", str(tmp_path / "branch"))
    assert result.returncode == 0, result.stderr[-3000:]
    branch = run_dir_of(result.stdout)
    assert branch.parent == tmp_path / "branch" and "(resumed at step 3)" in result.stdout
    expected, actual = lora_of(trained / "final"), lora_of(branch / "final")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert digest(run_copy) == before  # the old run: no final/ replaced, no checkpoint pruned, no lines added
    recorded = json.loads((branch / "args.json").read_text())["resumed_from"]
    assert recorded == str(older), recorded[:200]


@pytest.mark.slow
def test_weights_that_evaluate_to_non_finite_scores_leave_no_final(tiny, tmp_path):
    """--lr 1e10 for one step: finite weights of about 1e10 whose samples score nan (before: exit 0, final/ written,
    and a bare NaN in metrics.jsonl)."""
    result = rocm_kl_run(tmp_path, *tiny_run_flags(tiny, tmp_path, 1), "--lr", "1e10")
    line = one_line_error(result)
    assert re.fullmatch(f"error: .*non-finite evaluation scores, so final/ is removed; {NONFINITE_FIX}, no checkpoint "
                        "has finite weights", line), line
    run_dir = run_dir_of(result.stdout)
    assert not (run_dir / "final").exists()
    assert {"step": 1, "eval/clipscore": None, "eval/diversity": None} in strict_json_lines(run_dir / "metrics.jsonl")


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line(tiny, tmp_path):
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([sys.executable, str(REPO / "rocm_kl.py"), *tiny_run_flags(tiny, tmp_path, 100),
                                    "--save-every", "1"], cwd=tmp_path, stdout=stdout, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 600
        while not list(tmp_path.glob("runs/*/checkpoints/step_000001")) and time.time() < deadline:
            assert process.poll() is None, err.read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) != 0
    assert "Traceback" not in err.read_text(), err.read_text()[-3000:]
    assert_interrupted_line(err.read_text().strip().splitlines()[-1], run_dir_of(out.read_text()))


@pytest.mark.slow
def test_the_final_lora_is_saved_before_its_evaluation(tiny, tmp_path, monkeypatch, one_torch_thread):
    grids = []

    def record_grid(images, path):
        grids.append((path.name, (path.parent.parent / "final" / "pytorch_lora_weights.safetensors").is_file()))

    monkeypatch.setattr(rocm_kl, "save_image_grid", record_grid)
    rocm_kl.main(tyro.cli(rocm_kl.Args, args=tiny_run_flags(tiny, tmp_path, 1)))
    assert grids == [("step_000000.png", False), ("step_000001.png", True)]
