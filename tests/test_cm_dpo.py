"""cm_dpo.py: the per-step log-ratio, DPO at the start and after a few steps, the seed form's sign, L_con,
online pair selection, both pair modes end to end, bad pairs files, the algorithm part copied out alone."""

import ast
import dataclasses
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tyro

import cm_dpo
from tests.conftest import load_tiny, lora_of, run_dir_of, tiny_args

PROMPTS = ["a cat", "a red apple on a table"]
LATENT_SHAPE = (4, 16, 16)


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """The scripts run as subprocesses beside pytest on a shared machine: one BLAS thread each, no oversubscription."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lcm(tiny):
    """The tiny pipeline loaded through cm_dpo's own loader, with a LoRA attached."""
    encode, vae, unet, scheduler = load_tiny(cm_dpo, tiny["lcm"])
    lora_params = cm_dpo.add_lora(unet, rank=4, alpha=4)
    return encode, vae, unet, scheduler, lora_params


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
        record = {"prompt": prompt, "winner": f"images/winner_{i}.png", "loser": f"images/loser_{i}.png"}
        lines.append(json.dumps(record))
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "pairs.jsonl"


def set_lora(lcm, scale=0.0, seed=0):
    """B matrices to zero (the policy is the reference) or to small random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lcm[2].named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def make_args(**overrides):
    settings = dict(device="cpu", mixed_precision="no", resolution=32, num_inference_steps=4, batch_size=2,
                    gradient_checkpointing=False, con_weight=0.0, pairs="offline")
    return cm_dpo.Args(**{**settings, **overrides})


def pair_setup(lcm, args, module=cm_dpo):
    """The sampling setup of one CPU process, built from `module` (the script, or its algorithm part copied out)."""
    encode, vae, unet, scheduler, _ = lcm
    schedule = module.lcm_schedule(scheduler, args.num_inference_steps, "cpu")
    w_row = module.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 1, "cpu")
    return module.PairSetup(models=(encode, vae, unet), schedule=schedule, latent_shape=LATENT_SHAPE,
                            w_row=w_row, grid_size=50, seed=args.seed, batch_size=args.batch_size)


def offline_batch(lcm, args, pairs_file, step=1):
    setup = pair_setup(lcm, args)
    offline = cm_dpo.OfflinePairs(cm_dpo.read_pairs(pairs_file), args.resolution, args.offline_chain)
    batch = offline.batch(setup, step, 0)
    return batch, setup.schedule, setup.w_row.expand(2 * args.batch_size, -1)


def objective_of(lcm, args, schedule, ema=None, module=cm_dpo):
    return module.CmDpoObjective(lcm[2], lcm[3], schedule, ema, beta=args.beta, eps=args.eps,
                                 dpo_form=args.dpo_form, last_step=args.last_step, con_weight=args.con_weight,
                                 con_target=args.con_target, con_loss=args.con_loss,
                                 gradient_checkpointing=args.gradient_checkpointing)


def online_pairs(lcm, args, reward_fn):
    pairs = cm_dpo.OnlinePairs(PROMPTS, reward_fn, args.samples_per_prompt, args.reward_margin)
    return pairs.batch(pair_setup(lcm, args), 1, 0)


def test_chain_matches_the_diffusers_pipeline(tiny, lcm):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    expected = pipe(PROMPTS, num_inference_steps=4, guidance_scale=8.5, height=32, width=32,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    encode, _, unet, scheduler, _ = lcm
    set_lora(lcm)
    schedule = cm_dpo.lcm_schedule(scheduler, 4, "cpu")
    latents, noises = cm_dpo.draw_chain_noise((2, *LATENT_SHAPE), 4, torch.Generator().manual_seed(3), "cpu")
    embeds = encode(PROMPTS)
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
        log_ratio = cm_dpo.step_log_ratio(target, mean_policy, mean_ref, weight)
        assert torch.allclose(log_ratio, expected, rtol=1e-4, atol=1e-2)
    # its expectation under the policy is the KL, the seed's per-step term
    divergence = cm_dpo.step_divergence(mean_policy, mean_ref, 2.0)
    assert divergence.allclose((mean_policy - mean_ref).square().flatten(1).sum(1))


def test_log_ratios_are_means_over_latent_dimensions_and_the_kl_stays_exact(lcm, pairs_file):
    """beta multiplies the per-dimension mean of each step's log-ratio (the same meaning at every resolution);
    the logged KL is the exact one, summed over dimensions."""
    set_lora(lcm, scale=0.02)
    args = make_args(last_step="drop", beta=2.0)
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    objective = objective_of(lcm, args, schedule)
    unet = lcm[2]
    log_ratio, kl = torch.zeros(4), torch.zeros(4)
    with torch.no_grad():
        terms = objective.trajectory_terms(batch, w_embedding)
        _, stats = objective(batch, w_embedding, 1.0)
        for i, step in enumerate(schedule[:-1]):  # stochastic steps: std sigma' >= 0.13 > eps, so w_k = 1 / sigma'^2
            f_policy = cm_dpo.consistency_fn(unet, batch.states[i], step, batch.embeds, w_embedding)
            f_ref = cm_dpo.reference_fn(unet, batch.states[i], step, batch.embeds, w_embedding)
            policy = torch.distributions.Normal(step.alpha_next * f_policy, step.sigma_next)
            reference = torch.distributions.Normal(step.alpha_next * f_ref, step.sigma_next)
            x = batch.states[i + 1]
            log_ratio += (policy.log_prob(x) - reference.log_prob(x)).flatten(1).mean(1)
            kl += torch.distributions.kl_divergence(policy, reference).flatten(1).sum(1)
    assert kl.min() > 0 and log_ratio.abs().min() > 0
    assert torch.allclose(terms["total"], log_ratio, rtol=1e-3, atol=1e-6), (terms["total"], log_ratio)
    assert torch.allclose(terms["kl"], kl, rtol=1e-3)
    winner, loser = log_ratio.chunk(2)
    assert torch.allclose(stats["implicit_margin"], 2.0 * (winner - loser), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dpo_form", ["logratio", "seed"])
@pytest.mark.parametrize("last_step", ["drop", "smooth", "constrain"])
def test_dpo_loss_is_log_2_before_the_first_update(lcm, pairs_file, dpo_form, last_step):
    set_lora(lcm)
    args = make_args(dpo_form=dpo_form, last_step=last_step)
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    loss, stats = objective_of(lcm, args, schedule)(batch, w_embedding, 1.0)
    assert torch.equal(stats["implicit_margin"], torch.zeros(2))
    assert torch.equal(stats["loss_dpo"], torch.full((2,), math.log(2.0)))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-7)
    assert torch.equal(stats["kl"], torch.zeros(4))


def train(lcm, args, batch, schedule, w_embedding, steps, lr=1e-3):
    objective = objective_of(lcm, args, schedule)
    optimizer = torch.optim.Adam(lcm[4], lr=lr)
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
    assert (stats["implicit_margin"] > 0).all(), stats["implicit_margin"]
    assert loss.item() < math.log(2.0)


def test_the_seed_form_ignores_where_the_chains_went_and_pushes_the_winner_away(lcm, pairs_file):
    """The seed's literal loss has no gradient at the reference, does not look at the observed
    transitions (only at f_theta - f_ref), and lowers itself by moving the winner away from the reference."""
    args = make_args(dpo_form="seed")
    set_lora(lcm)
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    objective = objective_of(lcm, args, schedule)
    loss, _ = objective(batch, w_embedding, 1.0)
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, lcm[4]))

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


@pytest.mark.parametrize("dpo_form", ["logratio", "seed"])
def test_swapping_winner_and_loser_reverses_the_gradient(lcm, pairs_file, dpo_form):
    """Both forms' losses are antisymmetric in the pair's order, so reversed preferences push the policy the other
    way (the seed form too; the digits-world runs in benchmarks/results/cm_dpo_beta.md show the same)."""
    set_lora(lcm, scale=0.02)
    args = make_args(dpo_form=dpo_form)
    batch, schedule, w_embedding = offline_batch(lcm, args, pairs_file)
    swap = torch.cat([torch.arange(2, 4), torch.arange(0, 2)])
    swapped = dataclasses.replace(batch, states=[state[swap] for state in batch.states], embeds=batch.embeds[swap])
    objective = objective_of(lcm, args, schedule)

    def gradient(pairs):
        loss, _ = objective(pairs, w_embedding, 1.0)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, lcm[4])])

    preferred, reversed_ = gradient(batch), gradient(swapped)
    assert preferred.norm() > 0
    assert F.cosine_similarity(preferred, reversed_, dim=0) < -0.99


@pytest.mark.parametrize("con_loss", ["l2", "huber"])
def test_con_loss_is_zero_when_the_model_equals_its_target(lcm, con_loss):
    encode, _, unet, scheduler, _ = lcm
    embeds = encode(PROMPTS)
    w_embedding = cm_dpo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 2, "cpu")
    step = cm_dpo.chain_step(scheduler, torch.tensor([259, 759]), None, "cpu")
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    set_lora(lcm)  # the policy is the reference
    reference = objective_of(lcm, make_args(con_loss=con_loss, con_target="reference"), [])
    assert torch.equal(reference.consistency_gap(x, step, x, step, embeds, w_embedding), torch.zeros(2))
    set_lora(lcm, scale=0.05)  # the policy moved, its EMA equals it
    ema = {name: p.detach().clone() for name, p in unet.named_parameters() if p.requires_grad}
    averaged = objective_of(lcm, make_args(con_loss=con_loss, con_target="ema"), [], ema=ema)
    assert torch.equal(averaged.consistency_gap(x, step, x, step, embeds, w_embedding), torch.zeros(2))
    assert (reference.consistency_gap(x, step, x, step, embeds, w_embedding) > 0).all()
    # adjacent timesteps of the consistency grid: the loss measures an actual gap
    high = cm_dpo.chain_step(scheduler, torch.tensor([279, 779]), None, "cpu")
    assert (averaged.consistency_gap(x, high, x, step, embeds, w_embedding) > 0).all()
    set_lora(lcm, scale=0.05, seed=1)  # the policy moves on and its EMA stays: the target is the EMA's output
    assert (averaged.consistency_gap(x, step, x, step, embeds, w_embedding) > 0).all()


def test_online_pairs_keep_the_sampled_chains_of_the_best_and_worst_sample(lcm):
    encode, vae, unet, scheduler, _ = lcm
    set_lora(lcm, scale=0.05)

    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))

    schedule = cm_dpo.lcm_schedule(scheduler, 4, "cpu")
    w_row = cm_dpo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 1, "cpu")
    args = make_args(pairs="online", samples_per_prompt=3)
    batch = online_pairs(lcm, args, brightness)
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
    strict = online_pairs(lcm, make_args(pairs="online", reward_margin=1.0), brightness)
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


@pytest.mark.slow
def test_resume_continues_the_ema_and_the_multiplier_exactly(tiny, run_script, pairs_file):
    """cm_dpo's own state in a checkpoint, the EMA of L_con's target and the dual-ascent multiplier, continues: resumed
    after step 2, a run ends with the weights and the multiplier of the same run uninterrupted."""
    flags = ["--pairs", "offline", "--pairs-file", str(pairs_file), "--lr", "1e-2", "--eval-rewards", "--con-target",
             "ema", "--ema-decay", "0.5", "--last-step", "constrain", "--dual-lr", "10", "--last-step-budget", "0"]
    straight = run_script("cm_dpo.py", *tiny_args(tiny, steps=3), *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_script("cm_dpo.py", *tiny_args(tiny, steps=2), *flags, "--save-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = run_dir_of(first.stdout)
    resumed = run_script("cm_dpo.py", "--resume", str(run_dir), "--train-steps", "3")
    assert resumed.returncode == 0 and "resumed at step 2" in resumed.stdout, resumed.stderr[-3000:]
    expected = [m for m in metrics_of(run_dir_of(straight.stdout)) if "train/multiplier" in m]
    continued = [m for m in metrics_of(run_dir) if "train/multiplier" in m]
    assert [m["step"] for m in continued] == [1, 2, 3] and continued[-1]["train/multiplier"] > 1.0
    assert continued[-1]["train/multiplier"] == expected[-1]["train/multiplier"]
    assert_same_lora(lora_of(run_dir / "final"), lora_of(run_dir_of(straight.stdout) / "final"))


def assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_the_default_beta_depends_on_where_the_pairs_come_from():
    """Online pairs are sampled from the policy itself and differ ~100x less in log-ratio than offline pairs, so
    each mode gets the beta that keeps L_DPO informative there; an explicit --beta wins."""
    assert cm_dpo.Args().beta == 3.0 and cm_dpo.Args(pairs="offline").beta == 0.3
    assert tyro.cli(cm_dpo.Args, args=["--pairs", "offline", "--pairs-file", "p.jsonl"]).beta == 0.3
    assert tyro.cli(cm_dpo.Args, args=["--beta", "7"]).beta == 7.0


def digits_world_flags(steps: int) -> list[str]:
    from world.digits_metrics import WORLD_DIR

    return ["--model", str(WORLD_DIR / "lcm"), "--reward", f"aesthetic={WORLD_DIR / 'aesthetic'}", "--eval-rewards",
            "--prompts-file", str(WORLD_DIR / "prompts_train.txt"), "--eval-prompts-file",
            str(WORLD_DIR / "prompts_eval.txt"), "--resolution", "32", "--num-inference-steps", "4",
            "--train-steps", str(steps), "--eval-every", "0", "--batch-size", "2", "--lr", "1e-3"]


@pytest.mark.slow
def test_the_default_beta_keeps_online_pairs_informative_and_moves_the_policy(run_script):
    """Digits world, online pairs ranked by thickness at the default beta: L_DPO keeps its gradient and the samples
    get thicker (at beta 0.3, the offline default, they barely moved: 0.14 -> 0.16 held out after 20 steps)."""
    result = run_script("cm_dpo.py", *digits_world_flags(20))
    assert result.returncode == 0, result.stderr[-3000:]
    train = [m for m in metrics_of(run_dir_of(result.stdout)) if "train/loss_dpo" in m]
    assert len(train) == 20
    assert min(m["train/loss_dpo"] for m in train) > 0.1, [round(m["train/loss_dpo"], 4) for m in train]
    reward = [m["train/reward"] for m in train]
    assert np.mean(reward[-5:]) > np.mean(reward[:5]) + 0.05, [round(r, 3) for r in reward]


@pytest.mark.slow
def test_the_default_beta_does_not_saturate_on_offline_digit_pairs(run_script, tmp_path):
    """Digits world, Table 1's lr and pairs per step, offline pairs with a known preference (thick real digits over
    thin ones): at the default beta L_DPO keeps its gradient (loss_dpo > 0.1 at every one of the first 20 steps)
    while the implicit reward learns the preference. (The old default, 0.1 on log-ratios summed over the
    256 latent dims, drove loss_dpo to ~1e-5 within a few steps.)"""
    from benchmarks.cm_dpo_beta import write_thickness_pairs
    from world.digits_metrics import WORLD_DIR

    prompts = (WORLD_DIR / "prompts_train.txt").read_text().splitlines()
    pairs = write_thickness_pairs(tmp_path / "pairs", prompts, pairs_per_prompt=2)
    result = run_script("cm_dpo.py", *digits_world_flags(20), "--pairs", "offline", "--pairs-file", str(pairs))
    assert result.returncode == 0, result.stderr[-3000:]
    train = [m for m in metrics_of(run_dir_of(result.stdout)) if "train/loss_dpo" in m]
    assert len(train) == 20
    assert min(m["train/loss_dpo"] for m in train) > 0.1, [round(m["train/loss_dpo"], 4) for m in train]
    assert np.mean([m["train/implicit_accuracy"] for m in train[10:]]) > 0.9
    assert train[-1]["train/implicit_margin"] > 0.3


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
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No such file or directory" in lines[0], lines
    assert lines[0].startswith(f"error: --pairs-file '{bad}' line 1: loser image '{tmp_path / 'gone.png'}' "
                               "cannot be read ("), lines  # the path as resolved against the file's directory


@pytest.mark.parametrize("flags,message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
    (["--pairs", "offline"], "--pairs offline needs --pairs-file"),
    (["--pairs-file", "pairs.jsonl"], "--pairs-file is read with --pairs offline"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--eps", "0"], "--eps must be > 0"),
    (["--con-weight", "-1"], "--con-weight must be >= 0"),
    (["--num-inference-steps", "1", "--last-step", "drop"], "leaves no step to compare"),
    (["--reward", "pickscor"], "unknown reward 'pickscor'"),
])
def test_bad_flags_are_one_line_errors(tiny, flags, message, capsys):
    import tyro

    args = tyro.cli(cm_dpo.Args, args=[*tiny_args(tiny), "--device", "cpu", "--mixed-precision", "no", *flags])
    with pytest.raises(SystemExit) as raised:
        cm_dpo.main(args)
    assert str(raised.value).startswith("error: ") and message in str(raised.value)


def test_a_pairs_file_without_pairs_offline_is_refused_in_one_line(tiny, run_script, pairs_file, tmp_path):
    """A pairs file would otherwise be ignored while the run trains on online pairs."""
    result = run_script("cm_dpo.py", *tiny_args(tiny), "--pairs-file", str(pairs_file))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --pairs-file is read with --pairs offline; add it"]
    assert not (tmp_path / "runs").exists()


def test_the_algorithm_part_runs_copied_out_alone(lcm, pairs_file):
    """Everything above main, executed alone (no infrastructure below it), draws the same offline pairs and computes
    the same loss as the script: the part a reader copies out needs nothing from below main."""
    text = Path(cm_dpo.__file__).read_text()
    main = next(node for node in ast.parse(text).body if getattr(node, "name", None) == "main")
    part = {"__name__": "cm_dpo_algorithm", "__file__": cm_dpo.__file__}
    exec(compile("".join(text.splitlines(keepends=True)[:main.lineno - 1]), "cm_dpo_algorithm", "exec"), part)
    assert "Run" not in part and "read_pairs" not in part and "derived_seed" in part
    set_lora(lcm, scale=0.02)
    args = make_args(offline_chain="renoise", con_weight=1.0)
    records = cm_dpo.read_pairs(pairs_file)
    results = []
    for module in (cm_dpo, types.SimpleNamespace(**part)):
        setup = pair_setup(lcm, args, module)
        batch = module.OfflinePairs(records, args.resolution, args.offline_chain).batch(setup, 1, 0)
        objective = objective_of(lcm, args, setup.schedule, module=module)
        with torch.no_grad():
            loss, _ = objective(batch, setup.w_row.expand(len(batch.embeds), -1), 1.0)
        results.append((batch, loss))
    (batch, loss), (copied_batch, copied_loss) = results
    assert all(torch.equal(a, b) for a, b in zip(batch.states, copied_batch.states))
    assert torch.equal(batch.con_noise, copied_batch.con_noise) and torch.equal(loss, copied_loss)


def write_bad_image(path, kind):
    """An image file that must not reach training: empty, not an image, or truncated."""
    from PIL import Image

    if kind == "0-byte file":
        path.write_bytes(b"")
    elif kind == "non-image file":
        path.write_text("this is a text file, not a PNG\n")
    elif kind == "truncated PNG":  # the header (and size) are intact: only decoding finds it
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize("kind", ["0-byte file", "non-image file", "truncated PNG", "missing file"])
def test_every_pair_image_is_decoded_before_training(pairs_file, tmp_path, kind):
    lines = pairs_file.read_text().splitlines()
    bad_image = tmp_path / "bad.png"
    write_bad_image(bad_image, kind)
    (tmp_path / "images").symlink_to(pairs_file.parent / "images")
    bad = tmp_path / "pairs.jsonl"  # the bad image on the last line, as the loser
    winner = str(pairs_file.parent / "images" / "winner_0.png")
    bad.write_text("\n".join([*lines, *lines, json.dumps({"prompt": "a cat", "winner": winner, "loser": "bad.png"})]))
    with pytest.raises(SystemExit) as raised:
        cm_dpo.read_pairs(bad)
    text = str(raised.value)
    assert text.startswith(f"error: --pairs-file '{bad}' line 5: loser image '{bad_image}' cannot be read ("), text
    assert "\n" not in text


def test_a_missing_or_empty_pairs_file_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("gone.jsonl", "empty.jsonl"):
        with pytest.raises(SystemExit, match=f"^error: --pairs-file '{tmp_path / name}' is missing or empty; [^\n]*$"):
            cm_dpo.read_pairs(tmp_path / name)


def test_an_empty_image_on_the_last_line_stops_the_script_before_any_model_loads(tiny, run_script, pairs_file,
                                                                                 tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "images").symlink_to(pairs_file.parent / "images")
    bad = tmp_path / "pairs.jsonl"
    winner = pairs_file.parent / "images" / "winner_0.png"
    record = {"prompt": "a cat", "winner": str(winner), "loser": "empty.png"}
    bad.write_text(pairs_file.read_text() + json.dumps(record))
    result = run_script("cm_dpo.py", *tiny_args(tiny), "--pairs", "offline", "--pairs-file", str(bad))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --pairs-file '{bad}' line 3: loser image '{tmp_path / 'empty.png'}' "
                               "cannot be read (cannot identify image file"), lines
    assert result.stdout == "" and not (tmp_path / "runs").exists()  # nothing loaded, no run directory
