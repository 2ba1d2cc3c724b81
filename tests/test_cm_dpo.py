"""cm_dpo.py: the per-step log-ratio, DPO at the start and after a few steps, the seed form's sign, L_con,
online pair selection, both pair modes end to end, bad pairs files."""

import contextlib
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import cm_dpo
from tests.conftest import run_dir_of, tiny_args

PROMPTS = ["a cat", "a red apple on a table"]
LATENT_SHAPE = (4, 16, 16)


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """The scripts run as subprocesses beside pytest on a shared machine: one BLAS thread each avoids oversubscription."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lcm(tiny):
    """The tiny pipeline loaded through cm_dpo's own loader, with a LoRA attached."""
    tokenizer, text_encoder, vae, unet, scheduler = cm_dpo.load_lcm(str(tiny["lcm"]), torch.device("cpu"), torch.float32)
    lora_params = cm_dpo.add_lora(unet, rank=4, alpha=4)
    return tokenizer, text_encoder, vae, unet, scheduler, lora_params


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Two offline pairs of 32x32 PNGs: smooth gradients win over noise. Image paths are relative to the file."""
    from PIL import Image

    directory = tmp_path_factory.mktemp("pairs")
    (directory / "images").mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (32, 1)), np.full((32, 32), 60.0 * (i + 1))], -1)
        Image.fromarray(smooth.astype(np.uint8)).save(directory / "images" / f"winner_{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(directory / "images" / f"loser_{i}.png")
        lines.append(json.dumps({"prompt": prompt, "winner": f"images/winner_{i}.png", "loser": f"images/loser_{i}.png"}))
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "pairs.jsonl"


def set_lora(lcm, scale=0.0, seed=0):
    """B matrices to zero (the policy is the reference) or to small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lcm[3].named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def make_args(**overrides):
    settings = dict(device="cpu", mixed_precision="no", resolution=32, num_inference_steps=4, batch_size=2,
                    gradient_checkpointing=False, con_weight=0.0, pairs="offline")
    return cm_dpo.Args(**{**settings, **overrides})


def offline_batch(lcm, args, pairs_file, step=1):
    tokenizer, text_encoder, vae, unet, scheduler, _ = lcm
    schedule = cm_dpo.lcm_schedule(scheduler, args.num_inference_steps, "cpu")
    w_row = cm_dpo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 1, "cpu")
    offline = cm_dpo.OfflinePairs(args, cm_dpo.read_pairs(pairs_file))
    batch = offline.batch((tokenizer, text_encoder, vae, unet), schedule, step, 0, 0, 1, LATENT_SHAPE, w_row, 50,
                          torch.device("cpu"), contextlib.nullcontext())
    return batch, schedule, w_row.expand(2 * args.batch_size, -1)


def objective_of(lcm, args, schedule, ema=None):
    return cm_dpo.CmDpoObjective(args, lcm[3], lcm[4], schedule, lcm[5], ema)


def test_chain_matches_the_diffusers_pipeline(tiny, lcm):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    expected = pipe(PROMPTS, num_inference_steps=4, guidance_scale=8.5, height=32, width=32,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    tokenizer, text_encoder, _, unet, scheduler, _ = lcm
    set_lora(lcm)
    schedule = cm_dpo.lcm_schedule(scheduler, 4, "cpu")
    latents, noises = cm_dpo.draw_chain_noise((2, *LATENT_SHAPE), 4, torch.Generator().manual_seed(3), "cpu")
    embeds = cm_dpo.encode_prompts(tokenizer, text_encoder, PROMPTS)
    states = cm_dpo.sample_trajectory(unet, latents, noises, schedule, embeds,
                                      cm_dpo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 2, "cpu"))
    assert len(states) == 5 and torch.equal(states[0], latents)
    assert (states[-1] - expected).abs().max().item() < 1e-6


def test_step_log_ratio_is_the_difference_of_normal_log_probs():
    generator = torch.Generator().manual_seed(0)
    target, mean_policy, mean_ref = (torch.randn(3, *LATENT_SHAPE, generator=generator) for _ in range(3))
    for variance, std in [(0.49, 0.7), (0.0, 0.1)]:  # a stochastic step; the last step, smoothed to std eps = 0.1
        weight = cm_dpo.step_weight(variance, eps=0.1)
        expected = (torch.distributions.Normal(mean_policy, std).log_prob(target)
                    - torch.distributions.Normal(mean_ref, std).log_prob(target)).flatten(1).sum(1)
        assert torch.allclose(cm_dpo.step_log_ratio(target, mean_policy, mean_ref, weight), expected, rtol=1e-4, atol=1e-2)
    # its expectation under the policy is the KL, the seed's per-step term
    assert cm_dpo.step_divergence(mean_policy, mean_ref, 2.0).allclose((mean_policy - mean_ref).square().flatten(1).sum(1))


@pytest.mark.parametrize("dpo_form", ["logratio", "seed"])
@pytest.mark.parametrize("last_step", ["drop", "smooth", "constrain"])
def test_dpo_loss_is_log_2_before_the_first_update(lcm, pairs_file, dpo_form, last_step):
    set_lora(lcm)
    args = make_args(dpo_form=dpo_form, last_step=last_step)
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    loss, stats = objective_of(lcm, args, schedule)(batch, w_embedding, 1.0)
    assert torch.equal(stats["margin"], torch.zeros(2))
    assert torch.equal(stats["loss_dpo"], torch.full((2,), math.log(2.0)))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-7)
    assert torch.equal(stats["kl"], torch.zeros(4))


def train(lcm, args, batch, schedule, w_embedding, steps, lr=1e-3):
    objective = objective_of(lcm, args, schedule)
    optimizer = torch.optim.Adam(lcm[5], lr=lr)
    for _ in range(steps):
        loss, _ = objective(batch, w_embedding, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective


@pytest.mark.slow
def test_a_few_steps_on_a_fixed_pair_raise_the_implicit_margin(lcm, pairs_file):
    set_lora(lcm)
    args = make_args()
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    objective = train(lcm, args, batch, schedule, w_embedding, steps=4)
    with torch.no_grad():
        loss, stats = objective(batch, w_embedding, 1.0)
    assert (stats["margin"] > 0).all(), stats["margin"]
    assert loss.item() < math.log(2.0)


def test_the_seed_form_ignores_where_the_chains_went_and_pushes_the_winner_away(lcm, pairs_file):
    """DESIGN.md section 4: the literal loss has no gradient at the reference, does not look at the observed
    transitions (only at f_theta - f_ref), and lowers itself by moving the winner away from the reference."""
    args = make_args(dpo_form="seed")
    set_lora(lcm)
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    objective = objective_of(lcm, args, schedule)
    loss, _ = objective(batch, w_embedding, 1.0)
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, lcm[5]))

    set_lora(lcm, scale=0.02)
    elsewhere = dataclasses.replace(batch, states=[*batch.states[:-1], torch.randn_like(batch.states[-1])])
    consistent = objective_of(lcm, make_args(), schedule)
    with torch.no_grad():
        before = objective.trajectory_terms(batch, w_embedding)["total"]
        assert torch.equal(objective.trajectory_terms(elsewhere, w_embedding)["total"], before)
        assert not torch.allclose(consistent.trajectory_terms(elsewhere, w_embedding)["total"],
                                  consistent.trajectory_terms(batch, w_embedding)["total"])
    train(lcm, args, batch, schedule, w_embedding, steps=3)
    with torch.no_grad():
        after = objective.trajectory_terms(batch, w_embedding)["total"]
    (winner_before, loser_before), (winner_after, loser_after) = before.chunk(2), after.chunk(2)
    assert (winner_after > winner_before).all()
    assert (winner_after - loser_after > winner_before - loser_before).all()


@pytest.mark.parametrize("con_loss", ["l2", "huber"])
def test_con_loss_is_zero_when_the_model_equals_its_target(lcm, con_loss):
    tokenizer, text_encoder, _, unet, scheduler, lora_params = lcm
    embeds = cm_dpo.encode_prompts(tokenizer, text_encoder, PROMPTS)
    w_embedding = cm_dpo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 2, "cpu")
    step = cm_dpo.per_sample_step(scheduler, torch.tensor([259, 759]), "cpu")
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    set_lora(lcm)  # the policy is the reference
    reference = objective_of(lcm, make_args(con_loss=con_loss, con_target="reference"), [])
    assert torch.equal(reference.consistency_gap(x, step, x, step, embeds, w_embedding), torch.zeros(2))
    set_lora(lcm, scale=0.05)  # the policy moved, its EMA equals it
    ema = [p.detach().clone() for p in lora_params]
    averaged = objective_of(lcm, make_args(con_loss=con_loss, con_target="ema"), [], ema=ema)
    assert torch.equal(averaged.consistency_gap(x, step, x, step, embeds, w_embedding), torch.zeros(2))
    assert (reference.consistency_gap(x, step, x, step, embeds, w_embedding) > 0).all()
    # adjacent timesteps of the consistency grid: the loss measures an actual gap
    high = cm_dpo.per_sample_step(scheduler, torch.tensor([279, 779]), "cpu")
    assert (averaged.consistency_gap(x, high, x, step, embeds, w_embedding) > 0).all()


def test_online_pairs_keep_the_sampled_chains_of_the_best_and_worst_sample(lcm):
    tokenizer, text_encoder, vae, unet, scheduler, _ = lcm
    set_lora(lcm, scale=0.05)

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    schedule = cm_dpo.lcm_schedule(scheduler, 4, "cpu")
    w_row = cm_dpo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 1, "cpu")
    args = make_args(pairs="online", samples_per_prompt=3)
    batch = cm_dpo.online_pairs(args, (tokenizer, text_encoder, vae, unet), brightness, schedule, PROMPTS, 1, 0, 0, 1,
                                LATENT_SHAPE, w_row, 50, torch.device("cpu"), contextlib.nullcontext())
    grouped = batch.rewards.view(2, 3)
    with torch.no_grad():
        scores = brightness(cm_dpo.decode(vae, batch.states[-1]), None)
    assert torch.allclose(scores, torch.cat([grouped.max(1).values, grouped.min(1).values]))
    assert torch.equal(batch.keep, torch.ones(2)) and (batch.gaps > 0).all()
    # the stored chain is the real one: every transition re-derives from the policy's mean plus its noise
    embeds = batch.embeds
    with torch.no_grad():
        f_last = cm_dpo.consistency_fn(unet, batch.states[3], schedule[3], embeds, w_row.expand(4, -1))
    assert torch.allclose(f_last, batch.states[4], atol=1e-5)
    strict = cm_dpo.online_pairs(make_args(pairs="online", reward_margin=1.0), (tokenizer, text_encoder, vae, unet),
                                 brightness, schedule, PROMPTS, 1, 0, 0, 1, LATENT_SHAPE, w_row, 50,
                                 torch.device("cpu"), contextlib.nullcontext())
    assert torch.equal(strict.keep, torch.zeros(2))


def assert_loadable_lora_changes_the_pipeline(tiny, lora_dir):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    kwargs = dict(prompt=PROMPTS, num_inference_steps=4, height=32, width=32, output_type="latent")
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(lora_dir)
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-4


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_online_pairs_end_to_end(tiny, run_script):
    result = run_script("cm_dpo.py", *tiny_args(tiny, steps=3), "--lr", "1e-2", "--samples-per-prompt", "3",
                        "--eval-every", "2", "--save-every", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs/s" in result.stdout and "best and worst of 3 samples per prompt" in result.stdout
    run_dir = run_dir_of(result.stdout)
    train = [m for m in metrics_of(run_dir) if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    first = train[0]
    assert first["train/loss_dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert first["train/implicit_margin"] == 0.0 and first["train/kl"] == 0.0
    for key in ("train/reward", "train/reward_gap", "train/implicit_accuracy", "train/loss_con", "train/kept_pairs",
                "train/grad_norm", "perf/samples_per_s"):
        assert all(key in m for m in train), key
    assert train[-1]["train/kl"] > 0
    assert [m["step"] for m in metrics_of(run_dir) if "eval/clipscore" in m] == [0, 2, 3]
    assert (run_dir / "samples" / "step_000003.png").exists()
    assert (run_dir / "checkpoints" / "step_000002" / "training_state.pt").is_file()
    assert_loadable_lora_changes_the_pipeline(tiny, run_dir / "final")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    [],
    ["--offline-chain", "renoise", "--last-step", "constrain", "--dual-lr", "10", "--last-step-budget", "0",
     "--con-target", "ema",
     "--con-loss", "huber"],
])
def test_offline_pairs_end_to_end(tiny, run_script, pairs_file, flags):
    result = run_script("cm_dpo.py", *tiny_args(tiny, steps=3), "--pairs", "offline", "--pairs-file", str(pairs_file),
                        "--lr", "1e-2", "--eval-rewards", "--save-every", "3", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offline, 2 pairs" in result.stdout
    run_dir = run_dir_of(result.stdout)
    train = [m for m in metrics_of(run_dir) if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert train[0]["train/loss_dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert all("train/reward" not in m for m in train)
    if "constrain" in flags:  # the multiplier rises by dual ascent while the last-step gap exceeds its budget
        assert train[0]["train/last_step_gap"] == 0.0 and train[-1]["train/last_step_gap"] > 0
        assert train[-1]["train/multiplier"] > 1.0
        state = torch.load(run_dir / "checkpoints" / "step_000003" / "training_state.pt", weights_only=True)
        assert state["multiplier"] == train[-1]["train/multiplier"] and state["ema"] is not None
    assert_loadable_lora_changes_the_pipeline(tiny, run_dir / "final")


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a cat", "winner": "images/winner_0.png", "loser": ', "line 2 is not valid JSON"),
    ('{"prompt": "a cat", "winner": "images/winner_0.png"}', "line 2 needs string fields prompt, winner and loser"),
    ('["a cat", "images/winner_0.png", "images/loser_0.png"]', "line 2 needs string fields"),
    ('{"prompt": "a cat", "winner": "images/winner_0.png", "loser": "images/missing.png"}',
     "line 2: loser image"),
])
def test_a_bad_pairs_file_line_is_a_one_line_error_naming_it(pairs_file, tmp_path, line, message):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(pairs_file.read_text().splitlines()[0] + "\n" + line + "\n")
    (tmp_path / "images").symlink_to(pairs_file.parent / "images")
    with pytest.raises(SystemExit) as raised:
        cm_dpo.read_pairs(bad)
    text = str(raised.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_the_script_reports_a_bad_pairs_file_in_one_line(tiny, run_script, pairs_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f'{{"prompt": "a cat", "winner": "{pairs_file.parent}/images/winner_0.png", "loser": "gone.png"}}\n')
    result = run_script("cm_dpo.py", *tiny_args(tiny), "--pairs", "offline", "--pairs-file", str(bad))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --pairs-file '{bad}' line 1: loser image '{tmp_path / 'gone.png'}' does not exist; "
        "fix the path (relative paths start at the JSONL file's directory)"]


@pytest.mark.parametrize("flags,message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
    (["--pairs", "offline"], "--pairs offline needs --pairs-file"),
    (["--num-inference-steps", "1", "--last-step", "drop"], "leaves no step to compare"),
    (["--reward", "pickscor"], "unknown reward 'pickscor'"),
])
def test_bad_flags_are_one_line_errors(tiny, flags, message, capsys):
    import tyro

    args = tyro.cli(cm_dpo.Args, args=[*tiny_args(tiny), "--device", "cpu", "--mixed-precision", "no", *flags])
    with pytest.raises(SystemExit) as raised:
        cm_dpo.main(args)
    assert str(raised.value).startswith("error: ") and message in str(raised.value)
