"""Issue 17, every script: the non-finite guard keeps weights with a finite loss and prunes nothing; resume
applies what may change and refuses what it cannot honour; run directories are unique and locked; a failed
save keeps the weights. Functions named alike in the four scripts are identical copies (the tests that need
no training run call each script's copy)."""

import dataclasses
import errno
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file

from tests.conftest import REPO, run_dir_of, tiny_args

SCRIPTS = ["rocm_kl", "rocm_fdiv", "rlcm_ppo", "cm_dpo"]
CPU = ["--eval-rewards", "--device", "cpu", "--mixed-precision", "no"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A rocm_kl run of 4 steps at --lr 1e-2 with checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("trained")
    result = subprocess.run([sys.executable, str(REPO / "rocm_kl.py"), *tiny_args(tiny, steps=4), *CPU, "--lr", "1e-2",
                             "--save-every", "2", "--output-dir", str(out / "runs")],
                            cwd=out, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(result.stdout)


@pytest.fixture
def run_copy(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "runs" / trained.name))


@pytest.fixture
def small_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    importlib.import_module("rocm_kl").add_lora(unet, rank=2, alpha=2)
    return unet


def state_of(module, unet, step: int) -> dict:
    lora = [p for p in unet.parameters() if p.requires_grad]
    return module.training_state(step, unet, torch.optim.AdamW(lora), torch.amp.GradScaler("cpu", enabled=False), {})


def disk_full_under(directory: Path, monkeypatch) -> None:
    """Every safetensors file written under directory fails as on a full disk."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if str(filename).startswith(str(directory)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def assert_finite(checkpoint: Path) -> None:
    assert all(torch.isfinite(v).all() for v in load_file(checkpoint / "pytorch_lora_weights.safetensors").values())


# --- 1, 2: the guard and changed flags on resume ------------------------------------------------------------

@pytest.mark.slow
def test_guard_points_at_the_last_finite_weights_and_prunes_nothing(tiny, run_script, run_copy):
    checkpoints = run_copy / "checkpoints"
    step_4 = (checkpoints / "step_000004" / "training_state.pt").read_bytes()
    # a resumed run takes the new --lr (before, the checkpoint's 1e-2 silently stayed and nothing diverged)
    diverged = run_script("rocm_kl.py", *tiny_args(tiny, steps=20), "--eval-rewards", "--lr", "1e10", "--resume",
                          str(run_copy), "--max-nonfinite-steps", "2", "--checkpoint-limit", "1")
    assert diverged.returncode == 1 and "Traceback" not in diverged.stderr, diverged.stderr[-3000:]
    last = diverged.stderr.strip().splitlines()[-1]
    # step 5 (from step 4's weights) had a finite loss; its update broke the weights, which a stop must not save
    assert last.startswith("error: 2 non-finite steps in a row at step 7; the last weights with a finite loss are "
                           f"in {checkpoints / 'step_000004'}; lower --lr"), last
    assert last.endswith(f"and continue with --resume {checkpoints / 'step_000004'}"), last
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000004"]  # limit 1 pruned nothing
    assert (checkpoints / "step_000004" / "training_state.pt").read_bytes() == step_4

    resumed = run_script("rocm_kl.py", *tiny_args(tiny, steps=5), "--eval-rewards", "--lr", "1e-3", "--resume",
                         str(checkpoints / "step_000004"), "--save-every", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "non-finite" not in resumed.stdout and "step 5/5 reward" in resumed.stdout
    state = torch.load(checkpoints / "step_000005" / "training_state.pt", weights_only=True)
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [1e-3]
    assert "lr 0.01 -> 0.001" in resumed.stdout
    # args.json keeps the flags the run started with; each resume appends a record
    assert '"lr": 0.01' in (run_copy / "args.json").read_text()
    records = [line for line in (run_copy / "resumes.jsonl").read_text().splitlines()]
    assert len(records) == 2 and '"lr": [0.01, 0.001]' in records[1]


@pytest.mark.slow
def test_guard_saves_the_state_before_the_update_that_broke_the_weights(tiny, run_script):
    result = run_script("rocm_kl.py", *tiny_args(tiny, steps=20), "--eval-rewards", "--lr", "1e10",
                        "--max-nonfinite-steps", "2")
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = run_dir_of(result.stdout)
    saved = run_dir / "checkpoints" / "step_000000"  # step 1's loss was finite, its update made step 2's NaN
    assert result.stderr.strip().endswith(f"and continue with --resume {saved}"), result.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000000"]
    assert_finite(saved)
    resumed = run_script("rocm_kl.py", *tiny_args(tiny, steps=1), "--eval-rewards", "--lr", "1e-3", "--resume",
                         str(saved))
    assert resumed.returncode == 0 and "non-finite" not in resumed.stdout, resumed.stdout[-2000:]
    assert "resumed at step 0" in resumed.stdout and "step 1/1 reward" in resumed.stdout


@pytest.mark.slow
def test_a_checkpoint_saved_after_the_breaking_update_is_set_aside(tiny, run_script):
    """--save-every 1: step 1's checkpoint holds the weights its update broke (step 2's loss is the first to show
    it). The stop renames it, so that --resume RUN_DIR continues from the last finite weights, not from it."""
    result = run_script("rocm_kl.py", *tiny_args(tiny, steps=20), "--eval-rewards", "--lr", "1e10",
                        "--max-nonfinite-steps", "2", "--save-every", "1")
    assert result.returncode == 1, result.stderr[-3000:]
    checkpoints = run_dir_of(result.stdout) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000000", "step_000001.nonfinite"]
    assert f"warning: {checkpoints / 'step_000001'} holds weights that gave no finite loss" in result.stdout
    assert result.stderr.strip().endswith(f"and continue with --resume {checkpoints / 'step_000000'}")
    resumed = run_script("rocm_kl.py", *tiny_args(tiny, steps=1), "--eval-rewards", "--lr", "1e-3", "--resume",
                         str(checkpoints.parent))
    assert resumed.returncode == 0 and "resumed at step 0" in resumed.stdout, resumed.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rocm_kl.py", "rocm_fdiv.py", "rlcm_ppo.py", "cm_dpo.py"])
def test_a_run_ending_in_a_non_finite_streak_saves_the_last_finite_weights(script, tiny, run_script):
    """Fewer non-finite steps than --max-nonfinite-steps at the end: the run finishes, but final/ must not hold the
    weights that gave the non-finite loss (before, it saved them)."""
    result = run_script(script, *tiny_args(tiny, steps=3), "--eval-rewards", "--lr", "1e10",
                        "--max-nonfinite-steps", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: the run ended with" in result.stdout and "the last with a finite loss" in result.stdout
    assert_finite(run_dir_of(result.stdout) / "final")


@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "8"], "--lora-rank 16, this run has 8"),
    (["--resolution", "64"], "--resolution 32, this run has 64"),
    (["--batch-size", "1"], "--batch-size x ranks 2, this run has 1"),
])
def test_resume_refuses_other_run_defining_flags(tiny, run_copy, flags, message, monkeypatch):
    rocm_kl = importlib.import_module("rocm_kl")
    monkeypatch.setattr(rocm_kl, "load_lcm", lambda *a: pytest.fail("the check came after the models loaded"))
    args = tyro.cli(rocm_kl.Args, args=[*tiny_args(tiny), *CPU, "--resume", str(run_copy), *flags])
    checkpoint = run_copy / "checkpoints" / "step_000004"
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(checkpoint))}' was trained with "
                                         f"{re.escape(message)}; resume with the same value or start a new run$"):
        rocm_kl.main(args)


def test_flags_changed_on_resume_are_named_as_the_user_passes_them(tiny, run_copy, capsys):
    """Two ranks at half the batch keep the sample stream: allowed, and the line says "ranks", not --world-size."""
    rocm_kl = importlib.import_module("rocm_kl")
    args = tyro.cli(rocm_kl.Args, args=[*tiny_args(tiny, steps=4), *CPU, "--save-every", "2", "--resume",
                                        str(run_copy), "--batch-size", "1", "--lr", "1e-3"])
    record = {"script": "rocm_kl.py", "args": {**dataclasses.asdict(args), "world_size": 2, "global_batch": 2}}
    state, lock = rocm_kl.prepare_run(args, record, is_main=True)
    lock.close()
    assert state["changed"] == {"batch_size": [2, 1], "lr": [0.01, 0.001], "world_size": [1, 2]}
    assert capsys.readouterr().out.strip() == "changed on resume: --batch-size 2 -> 1, --lr 0.01 -> 0.001, ranks 1 -> 2"


# --- 3, 4: another script's checkpoint, an unreadable checkpoint --------------------------------------------

@pytest.mark.parametrize("script", ["rocm_fdiv", "rlcm_ppo", "cm_dpo"])
def test_resume_refuses_a_checkpoint_of_another_script(script, tiny, run_copy, monkeypatch):
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "load_lcm", lambda *a: pytest.fail("the check came after the models loaded"))
    args = tyro.cli(module.Args, args=[*tiny_args(tiny), *CPU, "--resume", str(run_copy)])
    checkpoint = run_copy / "checkpoints" / "step_000004"
    with pytest.raises(SystemExit, match=f"^error: '{re.escape(str(checkpoint))}' was written by rocm_kl.py; "
                                         "resume it with rocm_kl.py$"):
        module.main(args)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(script, run_copy, capsys):
    module = importlib.import_module(script)
    newest = run_copy / "checkpoints" / "step_000004"
    (newest / "training_state.pt").write_bytes((newest / "training_state.pt").read_bytes()[:2000])  # a full disk
    checkpoint, state = module.find_checkpoint(run_copy)
    assert checkpoint == run_copy / "checkpoints" / "step_000002" and state["step"] == 2
    warning = capsys.readouterr().out.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: skipping the unreadable checkpoint {newest} (")
    (checkpoint / "training_state.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=f"^error: no readable checkpoint in '{re.escape(str(run_copy))}'; "):
        module.find_checkpoint(run_copy)


# --- 5: unique, locked run directories; leftovers of interrupted saves ---------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_two_runs_started_in_the_same_second_get_two_directories(script, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    monkeypatch.setattr(module.time, "time", lambda: 1_800_000_000.0)
    args = module.Args(output_dir=str(tmp_path))
    first, second = module.new_run_dir(args, True, 1), module.new_run_dir(args, True, 1)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "_2"


@pytest.mark.slow
def test_a_run_directory_in_use_refuses_a_second_process(tiny, run_script, run_copy):
    lock = importlib.import_module("rocm_kl").lock_run_dir(run_copy)  # as if this process trained there
    result = run_script("rocm_kl.py", *tiny_args(tiny), "--eval-rewards", "--resume", str(run_copy))
    lock.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: another process (pid {os.getpid()}) is training in '{run_copy}'; wait for it to end or stop it"


@pytest.mark.parametrize("script", ["rocm_kl", "cm_dpo"])
def test_a_killed_process_leaves_no_stale_lock(script, tmp_path):
    module = importlib.import_module(script)
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; from pathlib import Path; import {script}; "
                               f"lock = {script}.lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); "
                               "time.sleep(600)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"^error: another process \\(pid {holder.pid}\\) is training in"):
            module.lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").read_text() == str(holder.pid)  # the dead process's pid is still in the file
    lock = module.lock_run_dir(tmp_path)
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.close()


@pytest.mark.parametrize("script", SCRIPTS)
def test_leftovers_of_interrupted_saves_are_removed(script, small_unet, tmp_path):
    module = importlib.import_module(script)
    checkpoints = tmp_path / "checkpoints"
    assert module.save_checkpoint(tmp_path, small_unet, state_of(module, small_unet, 1), 3)
    # a kill between save_lora's renames leaves step_N.old; one during writing leaves step_N.tmp
    for leftover in ("step_000001.old", "step_000005.old", "step_000006.tmp"):
        (checkpoints / leftover).mkdir()
        (checkpoints / leftover / "training_state.pt").write_bytes(b"partial")
    assert module.save_checkpoint(tmp_path, small_unet, state_of(module, small_unet, 1), 3)  # the .old no longer blocks
    assert module.save_checkpoint(tmp_path, small_unet, state_of(module, small_unet, 2), 3)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000001", "step_000002"]


# --- 6: a full disk ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_at_the_final_save_keeps_the_weights(script, small_unet, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir(), elsewhere.mkdir()
    module.save_lora(small_unet, tmp_path / "expected")
    disk_full_under(run_dir, monkeypatch)
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))  # the system's temporary directory
    with pytest.raises(SystemExit) as stop:
        module.save_final(small_unet, run_dir)
    message = str(stop.value)
    assert re.fullmatch(f"error: could not save the final LoRA \\({re.escape(str(run_dir))}: \\[Errno 28\\] No space "
                        f"left on device\\); the trained weights are in {re.escape(str(elsewhere))}/\\S+/final: move "
                        f"them to {re.escape(str(run_dir / 'final'))} once there is room", message), message
    saved = Path(re.search(r"the trained weights are in (\S+):", message).group(1))
    expected = load_file(tmp_path / "expected" / "pytorch_lora_weights.safetensors")
    actual = load_file(saved / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_at_a_checkpoint_warns_and_keeps_the_previous(script, small_unet, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(script)
    assert module.save_checkpoint(tmp_path, small_unet, state_of(module, small_unet, 1), 3)
    disk_full_under(tmp_path, monkeypatch)
    assert not module.save_checkpoint(tmp_path, small_unet, state_of(module, small_unet, 2), 3)
    assert capsys.readouterr().out.strip().splitlines() == [
        f"warning: could not save the checkpoint of step 2 in {tmp_path / 'checkpoints'} ([Errno 28] No space left on "
        "device); the earlier checkpoints are intact"]
    assert module.find_checkpoint(tmp_path)[1]["step"] == 1


# --- 8: an output directory that cannot take files -----------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_unusable_output_dir_is_one_line_before_models_load(script, where, tiny, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "load_lcm", lambda *a: pytest.fail("the check came after the models loaded"))
    (tmp_path / "file").write_text("")
    output = tmp_path / "file" if where == "a file" else tmp_path / "file" / "runs"
    args = tyro.cli(module.Args, args=[*tiny_args(tiny), *CPU, "--output-dir", str(output)])
    with pytest.raises(SystemExit, match=f"^error: --output-dir '{re.escape(str(output))}' cannot take files "
                                         f"\\('{re.escape(str(tmp_path / 'file'))}' is not a directory\\); pass a "
                                         "directory you can write to$"):
        module.main(args)
