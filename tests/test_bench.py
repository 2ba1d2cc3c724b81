"""benchmarks/bench_step.py: the harness runs the scripts' own steps and writes its table (CPU, tiny scale);
benchmarks/inductor_gradient_check.py: the reason bench_step.py --fast refuses inductor on the CPU."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = ["--scale", "tiny", "--device", "cpu", "--mixed-precision", "no", "--num-inference-steps", "2",
        "--warmup", "0", "--repeats", "1"]


def run_benchmark(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the benchmark on the tiny world; returns the process and the table's rows as {column: cell}."""
    output = tmp_path / "speed.md"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), *TINY,
               "--models-dir", str(tmp_path / "models"), "--output", str(output), *flags]
    # one OpenMP thread: on a shared, loaded CPU two spinning threads made a tiny step 70x slower (23 s against 0.3 s)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in output.read_text().splitlines()
            if line.startswith("| ") and "---" not in line]
    return result, [dict(zip(rows[0], row)) for row in rows[1:]]


@pytest.mark.slow
def test_benchmark_writes_a_row_per_script_and_batch(tmp_path):
    from benchmarks.bench_step import STEPS

    result, rows = run_benchmark(tmp_path, "--batch-sizes", "1", "2", "--scripts", *STEPS)
    names = ["rocm_kl", *(f"rocm_fdiv[{name}]" for name in ("kl", "reverse_kl", "hellinger", "js", "fisher", "none")),
             "rlcm_ppo", "cm_dpo"]
    assert [(row["script"], row["path"], int(row["batch"])) for row in rows] == \
        [(name, "eager", b) for b in (1, 2) for name in names]
    for row in rows:
        assert float(row["ms / image"]) > 0 and float(row["GFLOP / image"]) > 0
        assert 0 < float(row["% of matmul rate"]) < 100
        assert float(row["speed vs eager rocm_kl"].rstrip("x")) > 0 and row["parity"] == "-"
    images = {(row["script"], int(row["batch"])): int(row["images / step"]) for row in rows}
    # rlcm_ppo samples 4 sampling batches per iteration; cm_dpo 2 samples per prompt of each pair
    assert (images[("rocm_kl", 2)], images[("rlcm_ppo", 2)], images[("cm_dpo", 2)]) == (2, 8, 4)
    assert all(row["speed vs eager rocm_kl"] == "1.00x" for row in rows if row["script"] == "rocm_kl")


@pytest.mark.slow
def test_fast_rows_check_parity_and_compare_with_eager_rocm_kl(tmp_path):
    result, rows = run_benchmark(tmp_path, "--batch-sizes", "1", "--scripts", "rocm_kl", "rlcm_ppo", "--fast",
                                 "--compile-backend", "eager")
    assert [(row["script"], row["path"]) for row in rows] == [("rocm_kl", "eager"), ("rocm_kl", "fast"),
                                                              ("rlcm_ppo", "fast")]
    assert rows[0]["parity"] == "-" and rows[0]["speed vs eager rocm_kl"] == "1.00x"
    for row in rows[1:]:
        assert 0 <= float(row["parity"]) <= 1e-3
        assert float(row["speed vs eager rocm_kl"].rstrip("x")) > 0
    printed = [line for line in result.stdout.splitlines() if "fast path vs eager, max relative difference" in line]
    assert len(printed) == 2


@pytest.mark.slow
def test_each_base_gets_its_rows(tmp_path):
    """--base builds the base's tiny models (tests/tiny_world.build_bases; the SDXL base once, for both its LCMs) and
    times the step on it, at the base's guidance: w-conditioned, or classifier-free for the LCM-LoRAs."""
    guidance = {"sd_lcm_lora": "guidance 2, classifier-free", "sdxl_lcm_unet": "guidance 8.5, w-conditioned",
                "sdxl_lcm_lora": "guidance 2, classifier-free"}
    for base, words in guidance.items():
        result, rows = run_benchmark(tmp_path, "--base", base, "--batch-sizes", "1", "--scripts", "rocm_kl")
        assert [(row["base"], row["script"], int(row["batch"])) for row in rows] == [(base, "rocm_kl", 1)]
        assert float(rows[0]["ms / image"]) > 0 and float(rows[0]["GFLOP / image"]) > 0
        assert f"base {base} ({words}" in (tmp_path / "speed.md").read_text()
    assert sorted(path.name for path in (tmp_path / "models" / "tiny").iterdir()) == \
        ["clip", "lcm_lora_sd", "lcm_lora_sdxl", "lcm_sdxl_unet", "sd_base", "sdxl_base"]


def test_unknown_script_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--scripts", "nope",
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no benchmark for nope; choose from:")


def test_unknown_divergence_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--scripts", "rocm_fdiv",
                             "--divergences", "kl", "hellinga", "--device", "cpu"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown divergence hellinga; choose from: kl,")


@pytest.mark.slow
def test_the_inductor_gradient_check_finds_the_cpu_bug_and_its_workaround():
    """Why --fast refuses inductor on the CPU: if the first assertion fails, torch fixed inductor (pytorch PR
    #185873) and the refusal in the scripts' validate() can go."""
    check = [sys.executable, str(REPO / "benchmarks" / "inductor_gradient_check.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    default = subprocess.run(check, capture_output=True, text=True, env=env, timeout=600)
    assert default.returncode != 0 and "frozen weights: compiled input gradient off by 1.0e+00" in default.stdout
    assert default.stderr.strip().splitlines()[-1].startswith("error: inductor's input gradient is wrong here")
    workaround = subprocess.run([*check, "--no-layout-optimization"], capture_output=True, text=True, env=env, timeout=600)
    assert workaround.returncode == 0 and "matches eager" in workaround.stdout
