"""benchmarks/bench_step.py: the harness runs the scripts' own steps and writes its table (CPU, tiny scale)."""

import subprocess
import sys

from tests.conftest import REPO


def test_benchmark_writes_a_row_per_script_and_batch(tmp_path):
    from benchmarks.bench_step import STEPS

    output = tmp_path / "speed.md"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--scale", "tiny", "--device", "cpu",
               "--mixed-precision", "no", "--num-inference-steps", "2", "--batch-sizes", "1", "2", "--warmup", "0",
               "--repeats", "1", "--models-dir", str(tmp_path / "models"), "--output", str(output),
               "--scripts", *STEPS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    assert [(row[0].strip(), int(row[1])) for row in rows] == [(script, b) for script in STEPS for b in (1, 2)]
    for row in rows:
        figures = dict(zip([h.strip() for h in header], [cell.strip() for cell in row]))
        assert float(figures["ms / image"]) > 0 and float(figures["GFLOP / image"]) > 0
        assert 0 < float(figures["% of matmul rate"]) < 100


def test_unknown_script_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--scripts", "nope",
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no benchmark for nope; choose from:")
