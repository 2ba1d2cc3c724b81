"""What a run leaves and says: --track under WANDB_MODE=offline (continuing its wandb run on resume), and --track
that cannot start; final/'s model card and args.json; perf/ cost metrics; the step line's ETA; --help; and the
loading order and unsupported model families, each failing early with one line."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from tests.conftest import REPO, one_line_error, run_dir_of, tiny_args

SCRIPTS = ("rocm_kl.py", "rocm_fdiv.py", "rlcm_ppo.py", "cm_dpo.py")


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline wandb run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    raw, block = run_file.read_bytes(), 32768
    position, records, pending = 7, [], b""  # 7 bytes of file header, then 7-byte chunk headers
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(pending)
            pending = b""
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_tracked(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true"}
    (tmp_path / "wandb_dir").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(REPO / "rocm_kl.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.slow
def test_track_offline_model_card_cost_and_resume(tiny, tmp_path):
    """Two tracked steps then a resumed third: metrics.jsonl holds only JSON scalars, the offline wandb run
    holds the metrics and the sample grids as PNG files, the resumed run (given only --resume and --train-steps)
    continues the same wandb run, final/ has a model card and args.json, perf/ counts grow and the step lines
    show an ETA."""
    first = run_tracked(tmp_path, *tiny_args(tiny, steps=2), "--device", "cpu", "--mixed-precision", "no",
                        "--output-dir", str(tmp_path / "runs"), "--save-every", "2", "--track")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = run_dir_of(first.stdout)
    final = run_dir / "final"
    assert re.search(r"^eval step 0: eval/clipscore=\d", first.stdout, re.M), first.stdout
    step_lines = [line for line in first.stdout.splitlines() if re.match(r"step \d+/2 ", line)]
    assert len(step_lines) == 2 and all(re.search(r"elapsed .*\beta \d", line) for line in step_lines), first.stdout
    assert f"evaluate it: python benchmarks/evaluate.py --lora {final}" in first.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(value, (int, float)) for record in records for value in record.values())
    train = [record for record in records if "perf/train_images" in record]
    assert [record["step"] for record in train] == [1, 2]
    for name in ("perf/train_images", "perf/reward_queries", "perf/elapsed_s"):
        assert 0 < train[0][name] < train[1][name], (name, train)
    assert train[1]["perf/train_images"] == 2 * train[0]["perf/train_images"]

    card = (final / "README.md").read_text()
    first_eval_prompt = tiny["prompts"].read_text().splitlines()[0]
    for field in (f"base_model: {tiny['lcm']}", "`rocm_kl.py`", "clipscore | ",
                  f"DiffusionPipeline.from_pretrained({json.dumps(str(tiny['lcm']))})",
                  f"load_lora_weights({json.dumps(str(final))})", f"pipe({json.dumps(first_eval_prompt)}, "
                  "num_inference_steps=4"):
        assert field in card, (field, card)
    assert json.loads((final / "args.json").read_text())["train_steps"] == 2

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline_runs = list((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1
    pngs = list((offline_runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) == 2  # the grids of steps 0 and 2
    history = wandb_history(next(offline_runs[0].glob("run-*.wandb")))
    assert any("eval/clipscore" in row and row.get("eval/samples/_type") == "image-file" for row in history)
    assert any("perf/train_images" in row and "train/loss" in row for row in history)

    resumed = run_tracked(tmp_path, "--resume", str(run_dir), "--train-steps", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    third = [record for record in records if "perf/train_images" in record][-1]
    assert third["step"] == 3 and third["perf/elapsed_s"] > train[1]["perf/elapsed_s"]
    assert third["perf/train_images"] == 3 * train[0]["perf/train_images"]


def test_track_that_cannot_start_wandb_is_one_line_before_anything_loads_or_is_made(tmp_path):
    """No API key, no WANDB_MODE and no terminal to ask on: one line, before the LCM loads (here an empty
    directory, which would fail to load with another line) and before the run directory is made."""
    (tmp_path / "home").mkdir()
    (tmp_path / "empty_lcm").mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path / "home"),
               WANDB_CONFIG_DIR=str(tmp_path / "home" / ".config" / "wandb"))
    result = subprocess.run([sys.executable, str(REPO / "rocm_kl.py"), "--device", "cpu", "--mixed-precision", "no",
                             "--model", str(tmp_path / "empty_lcm"), "--output-dir", str(tmp_path / "runs"), "--track"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                            env=env)
    line = one_line_error(result)
    assert line.startswith("error: --track could not start wandb (") and "WANDB_MODE=offline" in line, line
    assert not (tmp_path / "runs").exists()


def test_an_uncached_hub_model_offline_fails_in_seconds_with_one_line(tiny, tmp_path):
    """A hub id that is not cached, under HF_HUB_OFFLINE=1 (what the README tells offline machines to set), stops
    with one line naming the id, HF_HUB_OFFLINE=1 and local directories."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    flags = tiny_args(tiny)
    flags[flags.index("--model") + 1] = "someone/an-uncached-lcm"
    result = subprocess.run([sys.executable, str(REPO / "rocm_kl.py"), "--device", "cpu", "--mixed-precision", "no",
                             "--output-dir", str(tmp_path / "runs"), *flags],
                            cwd=tmp_path, capture_output=True, text=True, timeout=90, env=env)
    line = one_line_error(result)
    assert "someone/an-uncached-lcm" in line and "HF_HUB_OFFLINE=1" in line and "local" in line, line


def test_lcm_loads_before_the_rewards(tiny, tmp_path, run_script):
    """Training reward and evaluation rewards load after the LCM: with a broken model and broken rewards
    the one error is the model's; with a good model, the training reward's."""
    flags = tiny_args(tiny)
    for name in ("no_lcm", "no_reward", "no_eval_reward"):  # existing but empty: past validate(), broken at load
        (tmp_path / name).mkdir()
    flags[flags.index("--model") + 1] = str(tmp_path / "no_lcm")
    flags[flags.index("--reward") + 1] = f"aesthetic={tmp_path / 'no_reward'}"
    flags[flags.index("--eval-rewards") + 1] = f"clipscore={tmp_path / 'no_eval_reward'}"
    line = one_line_error(run_script("rocm_kl.py", *flags))
    assert line.startswith(f"error: could not load --model '{tmp_path / 'no_lcm'}' ("), line

    flags[flags.index("--model") + 1] = str(tiny["lcm"])  # a good LCM: now the bad rewards are reached, in order
    line = one_line_error(run_script("rocm_kl.py", *flags))
    assert line.startswith(f"error: could not load the reward 'aesthetic={tmp_path / 'no_reward'}'"), line


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_a_description_and_single_defaults(script):
    """--help opens with the script's one-line summary; no field shows "(default: ...)" twice."""
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0
    summary = (REPO / script).read_text().split('"""')[1].split("\n\n")[0].strip()
    assert summary in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.count("(default:") > 1]


def test_eval_diversity_is_logged_at_step_0_and_the_end_or_skipped_with_one_line(tiny, tmp_path, capsys,
                                                                                 one_torch_thread):
    """eval/diversity, the spread of the held-out samples of a prompt (2 per prompt by default), comes with the base's
    evaluation and the final one; with no CLIP-based evaluation reward one line says it is skipped."""
    import tyro

    import rocm_kl

    flags = [*tiny_args(tiny, steps=1), "--device", "cpu", "--mixed-precision", "no", "--output-dir",
             str(tmp_path / "runs")]
    rocm_kl.main(tyro.cli(rocm_kl.Args, args=flags))
    output = capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir_of(output) / "metrics.jsonl").read_text().splitlines()]
    diversity = {record["step"]: record["eval/diversity"] for record in records if "eval/diversity" in record}
    assert list(diversity) == [0, 1] and all(0 < value <= 2 for value in diversity.values()), diversity
    assert "skipped" not in output

    flags[flags.index("--eval-rewards") + 1] = "jpeg_compressibility"
    rocm_kl.main(tyro.cli(rocm_kl.Args, args=flags))
    output = capsys.readouterr().out
    assert [line for line in output.splitlines() if "eval/diversity" in line] == [
        "eval/diversity skipped: it needs a CLIP-based evaluation reward and 2+ samples per prompt"]
    assert "eval/diversity" not in (run_dir_of(output) / "metrics.jsonl").read_text()
