"""benchmarks/evaluate.py: scores the base and a saved LoRA on identical noise, writes JSON, markdown, grid."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_dir_of, tiny_args


def evaluate(tiny, tmp_path, name, *flags):
    output = tmp_path / f"{name}.json"
    command = [sys.executable, str(REPO / "benchmarks" / "evaluate.py"), "--model", str(tiny["lcm"]),
               "--eval-rewards", f"clipscore={tiny['clip']}", f"aesthetic={tiny['aesthetic']}", "imagereward=/nowhere",
               "--eval-prompts-file", str(tiny["prompts"]), "--samples-per-prompt", "2", "--resolution", "32",
               "--num-inference-steps", "4", "--device", "cpu", "--mixed-precision", "no", "--output", str(output),
               *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600), output


@pytest.mark.slow
def test_base_and_lora_are_scored_on_the_same_noise(tiny, tmp_path, run_script):
    base, base_json = evaluate(tiny, tmp_path, "base")
    assert base.returncode == 0, base.stderr[-3000:]
    again, again_json = evaluate(tiny, tmp_path, "again")
    trained = run_script("rocm_kl.py", *tiny_args(tiny, steps=2), "--lr", "1e-2", "--eval-rewards")
    assert trained.returncode == 0, trained.stderr[-3000:]
    lora, lora_json = evaluate(tiny, tmp_path, "lora", "--lora", str(run_dir_of(trained.stdout) / "final"))
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert "No LoRA keys" not in lora.stderr and "torchvision" not in lora.stderr  # the pipeline's loading noise

    results = {name: json.loads(path.read_text())["results"] for name, path in
               [("base", base_json), ("again", again_json), ("lora", lora_json)]}
    assert set(results["base"]) == {"clipscore", "aesthetic"}  # imagereward cannot load: skipped, not fatal
    assert "warning: skipping imagereward" in base.stdout
    assert results["again"] == results["base"]
    assert results["lora"]["aesthetic"] != results["base"]["aesthetic"]
    table = lora_json.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| model | clipscore | aesthetic |" and len(table) == 3
    assert lora_json.with_suffix(".png").is_file()

    # the run's own flags (final/args.json) are the defaults: --lora alone evaluates as trained, beside the run
    final = run_dir_of(trained.stdout) / "final"
    bare = subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluate.py"), "--lora", str(final),
                           "--eval-rewards", f"aesthetic={tiny['aesthetic']}", "--samples-per-prompt", "2"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr[-3000:]
    beside = json.loads((final.parent / "eval" / "final.json").read_text())["results"]
    assert beside["aesthetic"] == results["lora"]["aesthetic"]


def test_a_directory_without_a_lora_is_a_one_line_error(tiny, tmp_path):
    result, _ = evaluate(tiny, tmp_path, "bad", "--lora", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no LoRA in '{tmp_path}'")
