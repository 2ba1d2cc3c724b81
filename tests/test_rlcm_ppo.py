"""rlcm_ppo.py: log-probs, the first ratio, the update's minibatch plan, gradient checkpointing, the clipped
objective, per-prompt normalization, end-to-end runs, bad input."""

import json

import pytest
import torch
import tyro

import rlcm_ppo
from tests.conftest import load_tiny, run_dir_of, tiny_args

PROMPTS = ["a cat", "a red apple on a table"]


@pytest.fixture(scope="module")
def lcm(tiny):
    encode, vae, unet, scheduler = load_tiny(rlcm_ppo, tiny["lcm"])
    rlcm_ppo.add_lora(unet, rank=4, alpha=4)
    with torch.no_grad():  # a policy away from the base, so nothing is trivially zero
        generator = torch.Generator().manual_seed(0)
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    unet.eval()
    return encode, vae, unet, scheduler


def rollout_of(lcm, reduction="mean", num_steps=4, batch=2, seed=3):
    encode, vae, unet, scheduler = lcm
    schedule = rlcm_ppo.lcm_schedule(scheduler, num_steps, "cpu")
    generator = torch.Generator().manual_seed(seed)
    latents, noises = rlcm_ppo.draw_chain_noise((batch, 4, 16, 16), num_steps, generator, "cpu")
    embeds = encode(PROMPTS[:batch])
    w = rlcm_ppo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, batch, "cpu")
    rollout = rlcm_ppo.sample_with_logprobs(unet, scheduler, latents, noises, schedule, embeds, w, PROMPTS[:batch],
                                            reduction)
    return rollout, schedule, w


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_stored_log_prob_is_the_normal_log_density(lcm, reduction):
    rollout, schedule, w = rollout_of(lcm, reduction)
    unet, scheduler = lcm[2], lcm[3]
    timesteps = torch.stack([step.t for step in schedule])
    for k in range(len(schedule) - 1):
        step = rlcm_ppo.policy_step(scheduler, timesteps, torch.full((2,), k), "cpu")
        with torch.no_grad():
            mean, std = rlcm_ppo.policy_mean_std(unet, rollout.latents[:, k], step, rollout.prompt_embeds, w)
        density = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(rollout.next_latents[:, k]).flatten(1)
        expected = density.mean(1) if reduction == "mean" else density.sum(1)
        assert torch.allclose(rollout.log_probs[:, k], expected, rtol=1e-5, atol=1e-5)
    assert rollout.log_probs.shape == (2, len(schedule) - 1)  # the deterministic last step is no action


def test_importance_ratio_is_exactly_one_on_the_first_minibatch(lcm):
    rollout, schedule, _ = rollout_of(lcm)
    rollout.advantages = torch.tensor([1.0, -1.0])
    objective = rlcm_ppo.PpoObjective(lcm[2], lcm[3], schedule, clip_range=1e-4, reduction="mean")
    shuffle = torch.Generator().manual_seed(0)
    samples, steps = rlcm_ppo.ppo_minibatches(2, len(schedule) - 1, 3, shuffle)[0]
    w = rlcm_ppo.guidance_embedding(8.5, lcm[2].config.time_cond_proj_dim, 3, "cpu")
    loss, stats = objective(rollout, samples, steps, w)
    assert stats["ratio_deviation"] == 0  # max |r - 1|: every ratio is exactly 1
    assert stats["approx_kl"] == 0 and stats["clip_fraction"] == 0
    loss.backward()  # at ratio 1 nothing is clipped: the policy gradient flows
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lcm[2].parameters() if p.requires_grad)
    lcm[2].zero_grad(set_to_none=True)


def test_minibatch_plan_covers_every_pair_once_and_groups_grad_accum_minibatches_per_step():
    minibatches = rlcm_ppo.ppo_minibatches(2, 3, 2, torch.Generator().manual_seed(0))  # 6 pairs, minibatches of 2
    pairs = sorted((int(n), int(k)) for samples, steps in minibatches for n, k in zip(samples, steps))
    assert len(minibatches) == 3 and pairs == [(n, k) for n in range(2) for k in range(3)]
    assert [len(group) for group in rlcm_ppo.accumulation_groups(minibatches, 2)] == [2, 1]  # a shorter last group
    assert [len(group) for group in rlcm_ppo.accumulation_groups(minibatches, 0)] == [3]  # 0: one step per epoch
    assert rlcm_ppo.accumulation_groups(minibatches, 1) == [[minibatch] for minibatch in minibatches]


def test_gradient_checkpointing_gives_the_same_gradient_and_stores_fewer_activations(lcm):
    """The policy's UNet call in PpoObjective is recomputed in the backward pass: the forward keeps a small
    fraction of the tensors autograd would otherwise store, and the LoRA gradient is the same."""
    rollout, schedule, _ = rollout_of(lcm)
    rollout.advantages = torch.tensor([1.0, -1.0])
    unet = lcm[2]
    lora = [p for p in unet.parameters() if p.requires_grad]
    samples, steps = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    w = rlcm_ppo.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 3, "cpu")
    losses, gradients, stored = [], [], []
    for gradient_checkpointing in (False, True):
        objective = rlcm_ppo.PpoObjective(unet, lcm[3], schedule, clip_range=1e-4, reduction="mean",
                                          gradient_checkpointing=gradient_checkpointing)
        saved = []

        def keep(tensor):  # autograd's hook for every tensor it stores for the backward pass
            saved.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss, _ = objective(rollout, samples, steps, w)
        losses.append(loss)
        gradients.append(torch.autograd.grad(loss, lora))
        stored.append(sum(saved))
    assert torch.equal(losses[0], losses[1])
    assert any(g.abs().sum() > 0 for g in gradients[0])
    for plain, recomputed in zip(*gradients):
        assert torch.allclose(plain, recomputed, rtol=1e-5, atol=1e-8)
    assert stored[1] < stored[0] / 10, stored  # the UNet's activations are not kept


@pytest.mark.parametrize("advantage,log_ratio,clipped", [
    (1.0, 0.5, True),     # ratio above 1 + eps with a positive advantage: no further push up
    (-1.0, -0.5, True),   # ratio below 1 - eps with a negative advantage: no further push down
    (1.0, -0.5, False),   # below the range but the advantage pulls it back: gradient flows
    (-1.0, 0.5, False),
    (1.0, 0.0, False),
])
def test_clipped_objective_gradient(advantage, log_ratio, clipped):
    old = torch.zeros(4)
    new = torch.full((4,), log_ratio, requires_grad=True)
    loss, stats = rlcm_ppo.ppo_clipped_loss(new, old, torch.full((4,), advantage), clip_range=0.1)
    loss.backward()
    if clipped:
        assert torch.equal(new.grad, torch.zeros(4)) and stats["clip_fraction"] == 1
    else:
        assert (new.grad.abs() > 0).all()


def test_per_prompt_normalizer_gives_standard_advantages_once_the_minimum_count_is_reached():
    tracker = rlcm_ppo.PerPromptStatTracker(buffer_size=8, min_count=4)
    generator = torch.Generator().manual_seed(0)
    prompts = ["a"] * 3 + ["b"] * 3
    first = tracker.update(prompts, torch.randn(6, generator=generator) + torch.tensor([0.0] * 3 + [10.0] * 3))
    assert tracker.last_per_prompt_fraction == 0  # 3 < 4 rewards per prompt: the batch's own mean and std
    assert abs(first.mean().item()) < 1e-5
    prompts = ["a"] * 5 + ["b"] * 5
    scales, means = torch.tensor([1.0] * 5 + [3.0] * 5), torch.tensor([0.0] * 5 + [10.0] * 5)
    rewards = torch.randn(10, generator=generator) * scales + means
    tracker.update(prompts, rewards)  # buffers now hold 8 rewards each
    assert tracker.last_per_prompt_fraction == 1
    advantages = tracker.update(["a"] * 8 + ["b"] * 8, torch.cat([rewards[:5], rewards[:3], rewards[5:], rewards[5:8]]))
    for half in (advantages[:8], advantages[8:]):  # each prompt's buffer is exactly this batch's 8 rewards
        assert abs(half.mean().item()) < 1e-5 and abs(half.std(unbiased=False).item() - 1) < 1e-4
    restored = rlcm_ppo.PerPromptStatTracker(1, 1)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["jpeg_compressibility", "aesthetic"])
def test_end_to_end_run_saves_a_loadable_lora(tiny, run_script, reward):
    from diffusers import LatentConsistencyModelPipeline

    result = run_script("rlcm_ppo.py", *tiny_args(tiny, steps=2), "--reward",
                        reward if reward.startswith("jpeg") else f"aesthetic={tiny['aesthetic']}", "--lr", "1e-2",
                        "--sample-batches", "2", "--train-batch-size", "3", "--grad-accum", "2", "--ppo-epochs", "2",
                        "--stat-min-count", "2", "--eval-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(result.stdout)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/reward" in m]
    assert [m["step"] for m in train] == [1, 2]
    for name in ("train/approx_kl", "train/clip_fraction", "train/reward_std", "perf/samples_per_s"):
        assert all(name in m for m in train)
    # 12 (sample, step) pairs / 3 per minibatch / 2 accumulated, x 2 epochs
    assert all(m["train/optimizer_steps"] == 4 for m in train)
    assert [m["step"] for m in metrics if "eval/clipscore" in m] == [0, 1, 2]

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    kwargs = dict(prompt=PROMPTS, num_inference_steps=4, height=32, width=32, output_type="latent")
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(run_dir / "final")
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-5


RLCM_TRAINING = ["--sample-batches", "1", "--grad-accum", "0", "--weight-decay", "0", "--lr-schedule", "linear",
                 "--lr-end-factor", "0.667"]


def test_rlcm_training_semantics_take_one_step_per_iteration_at_ratio_one(tiny, run_script):
    """docs/rlcm_ppo.md's original-RLCM flags: the gradient of every (sample, step) pair of the iteration, ONE
    optimizer step, so every ratio is 1 up to float rounding and clipping never acts; the LR decays linearly.
    Stepping after every minibatch instead (the same run with --grad-accum 1) makes the later ratios move."""
    def train_metrics(*flags):
        result = run_script("rlcm_ppo.py", *tiny_args(tiny, steps=2), "--lr", "1e-2", "--train-batch-size", "2",
                            "--stat-min-count", "2", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = (run_dir_of(result.stdout) / "metrics.jsonl").read_text().splitlines()
        return result.stdout, [m for m in map(json.loads, metrics) if "train/reward" in m]

    stdout, train = train_metrics(*RLCM_TRAINING)  # 2 images x 3 stochastic steps = 3 minibatches of 2, accumulated
    assert "2 (sample, step) pairs x 3 accumulation x 1 ranks = 6 pairs per optimizer step" in stdout
    assert [m["train/optimizer_steps"] for m in train] == [1, 1]
    assert all(m["train/clip_fraction"] == 0 for m in train)
    assert all(m["train/ratio_max_deviation"] < 1e-5 for m in train), [m["train/ratio_max_deviation"] for m in train]
    assert [m["train/lr"] for m in train] == pytest.approx([1e-2 * (1 - 0.333 * i / 2) for i in (1, 2)])

    _, stepping = train_metrics(*RLCM_TRAINING[:2], "--grad-accum", "1", "--no-gradient-checkpointing")
    assert [m["train/optimizer_steps"] for m in stepping] == [3, 3]
    assert max(m["train/clip_fraction"] for m in stepping) > 0
    assert max(m["train/ratio_max_deviation"] for m in stepping) > 1e-4


def test_lr_factor_follows_rlcms_linear_decay():
    # RLCM: LinearLR to 0 over 300 epochs, stepped before each of its 100 epochs of 10 iterations
    for iteration in (10, 500, 1000):
        rlcm = 1 - (iteration // 10) / 300
        assert rlcm_ppo.lr_factor("linear", 2 / 3, iteration, 1000) == pytest.approx(rlcm)
    assert rlcm_ppo.lr_factor("constant", 0.0, 7, 10) == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--grad-accum", "-1"], "--grad-accum must be >= 0"),
    (["--lr-end-factor", "2"], "--lr-end-factor must be in [0, 1]"),
    (["--num-inference-steps", "1"], "--num-inference-steps must be >= 2"),
    (["--train-batch-size", "5"], "--train-batch-size (5) must divide the 24 (sample, step) pairs per iteration, "
                                  "--batch-size x --sample-batches x (K-1) = 2 x 4 x 3"),
    (["--reward", "jpeg"], "unknown reward 'jpeg'"),
    (["--stat-min-count", "64"], "--stat-min-count (64) must be <= --stat-buffer-size (32)"),
])
def test_bad_input_is_a_one_line_error(tiny, run_script, flags, message):
    result = run_script("rlcm_ppo.py", *tiny_args(tiny), *flags)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--num-inference-steps", "1"], "--num-inference-steps must be >= 2 (got 1; the K-1 stochastic steps are "
                                     "PPO's actions)"),
    (["--sample-batches", "0"], "--sample-batches must be >= 1 (got 0)"),
    (["--train-batch-size", "0"], "--train-batch-size must be >= 1 (got 0)"),
    (["--grad-accum", "-1"], "--grad-accum must be >= 0 (got -1; 0: one optimizer step per epoch)"),
    (["--ppo-epochs", "0"], "--ppo-epochs must be >= 1 (got 0)"),
    (["--clip-range", "0"], "--clip-range must be > 0 (got 0.0)"),
    (["--adv-clip", "-1"], "--adv-clip must be > 0 (got -1.0)"),
    (["--stat-buffer-size", "0", "--stat-min-count", "0"], "--stat-buffer-size must be >= 1 (got 0)"),
    (["--stat-min-count", "0"], "--stat-min-count must be >= 1 (got 0)"),
    (["--lr-end-factor", "-0.5"], "--lr-end-factor must be in [0, 1] (got -0.5)"),
])
def test_own_flags_out_of_range_are_refused_before_anything_loads(flags, message):
    args = tyro.cli(rlcm_ppo.Args, args=["--device", "cpu", *flags])
    with pytest.raises(SystemExit) as refused:
        rlcm_ppo.validate(args)
    assert str(refused.value) == f"error: {message}"


def test_grad_accum_0_and_the_defaults_pass_validation():
    rlcm_ppo.validate(tyro.cli(rlcm_ppo.Args, args=["--device", "cpu", "--grad-accum", "0"]))
