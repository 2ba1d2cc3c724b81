"""benchmarks/experiments.py: the driver trains every configuration with the real scripts, evaluates each
LoRA, aggregates over seeds and redraws tables and figures without retraining."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks import experiments
from tests.conftest import REPO

DRIVER = [sys.executable, str(REPO / "benchmarks" / "experiments.py")]


def write_run(run_dir, script_args, rows):
    directory = run_dir / "x__0__1"
    directory.mkdir(parents=True)
    (directory / "args.json").write_text(json.dumps(script_args))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("script_args, expected", [
    ({"batch_size": 4, "grad_accum": 2}, 8),                                           # rocm_kl / rocm_fdiv
    ({"batch_size": 8, "sample_batches": 2, "grad_accum": 4}, 16),                     # rlcm_ppo: sampling counts
    ({"batch_size": 2, "grad_accum": 1, "pairs": "online", "samples_per_prompt": 3}, 6),  # cm_dpo online
    ({"batch_size": 2, "grad_accum": 1, "pairs": "offline", "samples_per_prompt": 3}, 2),  # cm_dpo offline
])
def test_images_per_step_counts_what_each_script_generates(script_args, expected):
    assert experiments.images_per_step(script_args) == expected


def test_curves_accumulate_training_time_and_images_and_align_evaluations(tmp_path):
    rows = [{"step": 0, "eval/clipscore": 2.0, "eval/aesthetic": 0.1},
            {"step": 1, "train/reward": 0.5, "perf/step_time_s": 1.5},
            {"step": 2, "train/reward": 0.7, "perf/step_time_s": 2.5},
            {"step": 2, "eval/clipscore": 1.8, "eval/aesthetic": 0.9},
            {"step": 3, "train/skipped_steps": 1}]
    write_run(tmp_path, {"batch_size": 4, "grad_accum": 1}, rows)
    curves = experiments.read_curves(tmp_path)
    assert curves["train_time"] == [1.5, 4.0] and curves["train_images"] == [4, 8]
    assert curves["train_reward"] == [0.5, 0.7]
    assert curves["eval_step"] == [0, 2] and curves["eval_time"] == [0.0, 4.0] and curves["eval_images"] == [0, 8]
    assert curves["eval_clipscore"] == [2.0, 1.8]


def test_mean_std_uses_the_sample_standard_deviation():
    assert experiments.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert experiments.mean_std([5.0]) == (5.0, 0.0)


def test_average_curve_averages_seeds_then_smooths():
    curves = [{"x": [1, 2, 3, 4], "y": [0.0, 2.0, 4.0, 6.0]}, {"x": [3, 4, 5, 6], "y": [2.0, 4.0, 6.0, 8.0]}]
    xs, ys = experiments.average_curve(curves, "x", "y", window=2)
    assert xs.tolist() == [3, 4, 5] and ys.tolist() == [2.0, 4.0, 6.0]


def test_grid_shows_the_regularized_run_the_judge_finds_closest_to_real_digits_and_the_unregularized_one():
    def entry(frechet):
        return {"summary": {"frechet_distance": (frechet, 0.0)}}

    results = {"table1": {"rocm-none": entry(40.0), "rocm-kl": entry(1.2), "rocm-js": entry(1.1),
                          "rlcm": entry(1.0),  # not a regularized ROCM run
                          "rocm-fisher": entry(1.3)}}
    assert experiments.pick_grid_runs(results) == [("best regularized: rocm-js", "rocm-js"),
                                                   ("unregularized: rocm-none", "rocm-none")]


@pytest.mark.slow
def test_driver_runs_every_experiment_aggregates_seeds_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "results"
    flags = ["--out", str(out), "--methods", "rocm-none", "rocm-kl", "rlcm", "cm-dpo", "--betas", "0.1",
             "--seeds", "0", "1", "--train-steps", "2", "--ppo-iterations", "1", "--eval-every", "1",
             "--eval-samples-per-prompt", "2"]
    first = subprocess.run(DRIVER + flags, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert list(results["table1"]) == ["rocm-none", "rocm-kl", "rlcm", "cm-dpo"]
    assert list(results["beta_sweep"]) == ["beta=0.1"]
    for method, entry in results["table1"].items():
        assert entry["seeds"] == [0, 1]
        evals = [json.loads((out / "evals" / "table1" / f"{method}__seed{seed}.json").read_text())["results"]
                 for seed in (0, 1)]
        assert set(evals[0]) == {"clipscore", "aesthetic", "digit_accuracy", "frechet_distance"}
        for metric in evals[0]:
            mean, std = entry["summary"][metric]
            assert mean == pytest.approx(np.mean([e[metric] for e in evals]))
            assert std == pytest.approx(np.std([e[metric] for e in evals], ddof=1))
        assert len(entry["curves"][0]["eval_clipscore"]) == len(entry["curves"][0]["eval_step"]) >= 2
    # different seeds train differently
    kl = [json.loads((out / "evals" / "table1" / f"rocm-kl__seed{seed}.json").read_text())["results"] for seed in (0, 1)]
    assert kl[0]["aesthetic"] != kl[1]["aesthetic"]

    table = (out / "table1.md").read_text().splitlines()
    assert table[2].startswith("| base (no training) |")
    assert [line.split(" |")[0] for line in table[3:]] == [f"| {m} (n=2)" for m in results["table1"]]
    assert (out / "beta_sweep.md").read_text().splitlines()[3].startswith("| beta=0.1 (n=2) |")
    for figure in ("curves.png", "beta_sweep.png", "grids.png"):
        assert Image.open(out / figure).size[0] > 500

    logs = {path: path.read_text() for path in (out / "runs").rglob("log.txt")}
    assert len(logs) == 10
    again = subprocess.run(DRIVER + flags, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.read_text() for path in logs} == logs  # nothing retrained or re-evaluated
    assert json.loads((out / "results.json").read_text())["table1"] == results["table1"]


@pytest.mark.parametrize("flags, message", [
    (["--methods", "rocm-tv2"], "error: unknown method 'rocm-tv2'; choose from: rocm-none"),
    (["--world", "/nowhere"], "error: the world directory '/nowhere' lacks"),
    (["--seeds"], "error: --jobs, --train-steps and --ppo-iterations must be >= 1 and --seeds non-empty"),
])
def test_bad_input_is_a_one_line_error_before_anything_runs(tmp_path, flags, message):
    result = subprocess.run(DRIVER + ["--out", str(tmp_path / "out"), *flags], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "out" / "runs").exists()


def test_a_partial_rerun_replaces_its_rows_and_keeps_the_others_from_results_json(tmp_path):
    """Run directories are not in git but results.json is: rerunning some configurations must not drop
    the rows of the others (nor keep a stale row of a rerun one)."""
    out = tmp_path / "results"
    (out / "evals").mkdir(parents=True)
    (out / "evals" / "base.json").write_text(json.dumps({"results": {"aesthetic": 0.1}}))

    def old_entry(value):
        return {"seeds": [0], "evals": [{"aesthetic": value}], "curves": [], "summary": {"aesthetic": [value, 0.0]}}

    previous = {"table1": {"rocm-none": old_entry(3.0), "rocm-kl": old_entry(1.0), "rlcm": old_entry(0.6)},
                "beta_sweep": {"beta=0.1": old_entry(0.9)}}
    (out / "results.json").write_text(json.dumps({"args": {}, **previous}))
    args = experiments.Args(out=str(out), experiments=("table1",), methods=("rocm-kl", "rocm-js", "rocm-fisher"),
                            seeds=(0,))
    runs = experiments.plan(args)
    for run in runs[:2]:  # rocm-kl and rocm-js finished; rocm-fisher failed
        run.eval_file(out).parent.mkdir(parents=True, exist_ok=True)
        run.eval_file(out).write_text(json.dumps({"results": {"aesthetic": 2.0}}))
        write_run(run.directory(out), {"batch_size": 4, "grad_accum": 1},
                  [{"step": 1, "train/reward": 0.5, "perf/step_time_s": 1.0, "train/kl": 0.25}])

    results = experiments.collect(args, runs)
    assert list(results["table1"]) == ["rocm-none", "rocm-kl", "rlcm", "rocm-js"]
    assert results["table1"]["rocm-none"] == previous["table1"]["rocm-none"]
    assert results["table1"]["rlcm"] == previous["table1"]["rlcm"]
    assert results["beta_sweep"] == previous["beta_sweep"]
    fresh = results["table1"]["rocm-kl"]
    assert fresh["summary"]["aesthetic"] == (2.0, 0.0) and fresh["curves"][0]["train_kl"] == [0.25]
    assert fresh["flags"][:4] == ["--divergence", "kl", "--beta", "0.03"]  # one beta scale: rocm_kl's best beta


def test_headline_runs_hellinger_at_the_headline_betas_against_none_and_reports_train_kl():
    args = experiments.Args(experiments=("headline",), seeds=(0,), out="benchmarks/results")
    runs = experiments.plan(args)
    assert [(run.method, run.flags[:4]) for run in runs] == [
        ("rocm-none", ["--divergence", "none", "--beta", "0"]),
        ("rocm-hellinger-beta=0.001", ["--divergence", "hellinger", "--beta", "0.001"]),
        ("rocm-hellinger-beta=0.064", ["--divergence", "hellinger", "--beta", "0.064"])]
    assert all(run.script == "rocm_fdiv.py" and run.flags[4:] == runs[0].flags[4:] for run in runs)

    metrics = ("aesthetic", *experiments.HELD_OUT)
    results = {"base": dict.fromkeys(metrics, 1.0), "headline": {}}
    for run, kl in zip(runs, (9.0, 8.0, 1.0)):
        results["headline"][run.method] = {
            "script": run.script, "flags": run.flags, "seeds": [0, 1],
            "curves": [{"train_kl": [0.0] * 5 + [kl] * 5}, {"train_kl": [0.0] * 5 + [kl + 2] * 5}],
            "summary": {m: (2.0, 0.1) for m in metrics}}
    paths = {name: experiments.Path("world/digits") / name for name in ("lcm", "clip", "aesthetic", "prompts_train.txt")}
    report = experiments.headline_report(args, results, paths, experiments.Path("x4.txt"))
    rows = {line.split(" |")[0]: line for line in report.splitlines() if line.startswith("| rocm-")}
    assert rows["| rocm-hellinger-beta=0.064 (n=2)"].startswith("| rocm-hellinger-beta=0.064 (n=2) | 0.064 | 2 ± 1.4 | 1 ± 0.71 |")
    assert "python rocm_fdiv.py --model world/digits/lcm" in report and "--divergence hellinger --beta 0.001" in report


def test_only_the_full_default_call_writes_the_committed_results():
    Args = experiments.Args
    assert experiments.results_dir(Args()) == "benchmarks/results"
    assert experiments.results_dir(Args(jobs=1, force=True)) == "benchmarks/results"
    assert experiments.results_dir(Args(seeds=(0,))) == "benchmarks/results/partial"
    assert experiments.results_dir(Args(experiments=("beta_sweep",))) == "benchmarks/results/partial"
    assert experiments.results_dir(Args(seeds=(0,), out="somewhere")) == "somewhere"


def test_the_diversity_table_has_a_row_per_evaluation_step_and_each_betas_columns():
    from benchmarks import diversity

    def run(values):
        return {"eval_step": [0, 5], "eval_diversity": values, "eval_clipscore": [2.0, 1.0],
                "eval_aesthetic": [0.1, 2.0]}

    table = diversity.report({0.0: [run([0.06, 0.01]), run([0.06, 0.03])], 0.03: [run([0.06, 0.05])]}, (0, 1))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| step | beta=0: diversity | beta=0: CLIP score (held out) |")
    assert rows[1:] == ["| 0 | 0.060 | 2.000 | 0.100 | 0.060 | 2.000 | 0.100 |",
                        "| 5 | 0.020 | 1.000 | 2.000 | 0.050 | 1.000 | 2.000 |"]
