"""rocm_fdiv.py: every divergence end to end, the regularizer at and far from the base, its pull towards
the base, stateless JS noise, kl (either reduction) == rocm_kl.py, bad divergence names."""

import functools
import json
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file

import rocm_fdiv
import rocm_kl
from common import DIVERGENCES
from tests.conftest import load_tiny, run_dir_of, tiny_args

PROMPTS = ["a cat", "a red apple on a table"]
REGULARIZERS = [(name, "quadrature") for name in DIVERGENCES if name != "none"] + [("js", "sampled")]
SATURATING = {"hellinger": 1.0, "js": 0.6931471805599453, "tv": 1.0}  # the joint bound of each, per step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lcm(tiny):
    """The tiny pipeline loaded through rocm_fdiv's own loader, with a LoRA attached."""
    encode, vae, unet, scheduler = load_tiny(rocm_fdiv, tiny["lcm"])
    rocm_fdiv.add_lora(unet, rank=4, alpha=4)
    return encode, vae, unet, scheduler


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])


def set_lora_b(unet, scale, seed=0):
    """LoRA B = scale * N(0, 1) (0: the base model); the distance of the policy from the base grows with scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def chain_inputs(lcm, seed=3, num_steps=4, batch=2):
    encode, vae, unet, scheduler = lcm
    schedule = rocm_fdiv.lcm_schedule(scheduler, num_steps, "cpu")
    latents, noises = rocm_fdiv.draw_chain_noise((batch, 4, 16, 16), num_steps, torch.Generator().manual_seed(seed),
                                                 "cpu")
    embeds = encode(PROMPTS[:batch])
    w_embedding = rocm_fdiv.guidance_embedding(8.5, unet.config.time_cond_proj_dim, batch, "cpu")
    return latents, noises, schedule, embeds, w_embedding


def tiny_main_args(tiny, tmp_path: Path, **overrides) -> rocm_fdiv.Args:
    """Args of a short in-process run on the tiny world, evaluation off (tiny_args' settings)."""
    settings = dict(model=str(tiny["lcm"]), reward=f"aesthetic={tiny['aesthetic']}", eval_rewards=(),
                    prompts_file=str(tiny["prompts"]), eval_prompts_file=str(tiny["prompts"]), resolution=32,
                    num_inference_steps=4, train_steps=2, eval_every=0, batch_size=2, device="cpu",
                    mixed_precision="no", output_dir=str(tmp_path / "runs"), lr=1e-2)
    return rocm_fdiv.Args(**{**settings, **overrides})


def test_the_readme_command_line_parses_and_the_default_beta_is_its_scale():
    args = tyro.cli(rocm_fdiv.Args, args=["--divergence", "hellinger", "--beta", "1e-3"])
    assert (args.divergence, args.beta, args.reduction, args.js_estimator) == ("hellinger", 1e-3, "per_dim", "quadrature")
    assert rocm_fdiv.Args().beta == 1e-3 and rocm_kl.Args().beta == 1e-4  # the paper's: Hellinger's, the KL's


@pytest.mark.slow
@pytest.mark.parametrize("divergence,estimator", [*REGULARIZERS, ("none", "quadrature")])
def test_every_divergence_trains_end_to_end_and_saves_a_loadable_lora(tiny, pipe, tmp_path, capsys, divergence,
                                                                       estimator):
    rocm_fdiv.main(tiny_main_args(tiny, tmp_path, divergence=divergence, js_estimator=estimator, beta=0.1))
    run_dir = run_dir_of(capsys.readouterr().out)
    train = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/reward" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert all("train/divergence" in m and "perf/samples_per_s" in m for m in train)
    if divergence == "none":  # no regularizer, but the KL to the base is measured all the same
        assert all(m["train/divergence"] == 0.0 for m in train)
        assert train[0]["train/kl"] == 0.0 and train[1]["train/kl"] > 0
    else:  # the first update leaves the base; the second step's chain measures the distance
        assert train[0]["train/divergence"] == 0.0 and train[0]["train/kl"] == 0.0
        assert train[1]["train/divergence"] > 0 and train[1]["train/kl"] > 0
    pipe.load_lora_weights(run_dir / "final")
    pipe.unload_lora_weights()


@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
@pytest.mark.parametrize("divergence,estimator", REGULARIZERS)
def test_regularizer_is_exactly_zero_at_the_base_and_positive_away_from_it(lcm, divergence, estimator, reduction):
    unet = lcm[2]
    for scale in (0.0, 0.05):
        set_lora_b(unet, scale)
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        with torch.no_grad():
            _, value, kl = rocm_fdiv.sample_chain(unet, *chain_inputs(lcm), divergence, reduction, estimator, generators)
        if scale == 0:
            assert torch.equal(value, torch.zeros(2)) and torch.equal(kl, torch.zeros(2))
        else:
            assert (value > 0).all() and (kl > 0).all(), value


@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
@pytest.mark.parametrize("divergence,estimator", REGULARIZERS)
def test_regularizer_gradient_is_finite_also_far_from_the_base(lcm, divergence, estimator, reduction):
    """Far from the base the joint hellinger, js and tv sit at their bounds with zero gradient (why per_dim
    is the default); per_dim still pulls. chi2 = exp(d2) - 1 is infinite there in float32, its true value
    to working precision (training skips such steps), so it is checked near the base only."""
    unet = lcm[2]
    set_lora_b(unet, 0.05 if divergence == "chi2" else 1.0)
    lora = [p for p in unet.parameters() if p.requires_grad]
    _, value, _ = rocm_fdiv.sample_chain(unet, *chain_inputs(lcm), divergence, reduction, estimator,
                                         [torch.Generator().manual_seed(i) for i in range(2)])
    grads = torch.autograd.grad(value.sum(), lora)
    assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
    if reduction == "per_dim":
        assert any(g.abs().sum() > 0 for g in grads)
    elif divergence in SATURATING:  # K-1 = 3 stochastic steps, each saturated
        assert torch.allclose(value, torch.full((2,), 3 * SATURATING[divergence]), rtol=1e-6)


def test_one_reference_pass_per_step_gives_the_divergence_and_the_kl(lcm):
    unet = lcm[2]
    set_lora_b(unet, 0.05)
    calls = []
    hook = unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            _, _, kl = rocm_fdiv.sample_chain(unet, *chain_inputs(lcm), "hellinger")
            assert len(calls) == 4 + 3  # K policy passes, K-1 reference passes
            _, kl_joint, _ = rocm_fdiv.sample_chain(unet, *chain_inputs(lcm), "kl", "joint")
            calls.clear()
            _, none, kl_none = rocm_fdiv.sample_chain(unet, *chain_inputs(lcm), "none")
            assert len(calls) == 4 + 3 and torch.equal(none, torch.zeros(2))  # the KL is still measured
            calls.clear()
            rocm_fdiv.sample_chain(unet, *chain_inputs(lcm))  # plain sampling (evaluation): no reference
            assert len(calls) == 4
    finally:
        hook.remove()
    assert torch.equal(kl, kl_joint) and torch.equal(kl, kl_none)  # train/kl is the joint KL, whatever the divergence trained with


def lora_delta_norm(unet) -> float:
    """Total Frobenius norm of the LoRA weight updates B @ A."""
    params = dict(unet.named_parameters())
    return sum((params[n.replace("lora_A", "lora_B")] @ a).norm().item() ** 2
               for n, a in params.items() if "lora_A" in n) ** 0.5


@pytest.fixture(scope="module")
def train_in_process(tiny, lcm):
    """10 AdamW steps at lr 1e-2 of rocm_fdiv's objective from a fresh LoRA -> (LoRA delta norm, final KL)."""
    from common import load_reward

    encode, vae, unet, scheduler = lcm
    reward_fn = load_reward("aesthetic", str(tiny["aesthetic"]))
    lora = [p for p in unet.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in lora]
    schedule = rocm_fdiv.lcm_schedule(scheduler, 4, "cpu")
    w_embedding = rocm_fdiv.guidance_embedding(8.5, unet.config.time_cond_proj_dim, 2, "cpu")

    def restore():  # A as add_lora drew it, B zero: the base model
        with torch.no_grad():
            for param, value in zip(lora, initial):
                param.copy_(value)
        set_lora_b(unet, 0.0)

    @functools.cache
    def train(divergence, estimator, beta):
        restore()
        objective = rocm_fdiv.RocmObjective((encode, vae, unet), reward_fn, schedule, beta,
                                            gradient_checkpointing=False, divergence=divergence, js_estimator=estimator)
        optimizer = torch.optim.AdamW(lora, lr=1e-2)
        for step in range(10):
            latents, noises = rocm_fdiv.draw_chain_noise((2, 4, 16, 16), 4, torch.Generator().manual_seed(step), "cpu")
            generators = [torch.Generator().manual_seed(100 * step + i) for i in range(2)]
            loss = objective(PROMPTS, latents, noises, w_embedding, generators)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # distance from the base in function space, on a chain none of the steps saw
            _, _, kl = rocm_fdiv.sample_chain(unet, *chain_inputs(lcm, seed=99), "kl", "joint")
        norm = lora_delta_norm(unet)
        restore()
        return norm, kl.mean().item()

    return train


@pytest.mark.slow
@pytest.mark.parametrize("divergence,estimator", REGULARIZERS)
def test_huge_beta_keeps_the_lora_near_the_base(train_in_process, divergence, estimator):
    # beta 1e4 makes every divergence's gradient dwarf the tiny reward's from the second step on (1e8
    # gives the same runs). Adam's sign-like steps keep jittering every weight by about lr, so the
    # parameter-space gap is a factor ~2 while the function-space gap is orders of magnitude.
    free_norm, free_kl = train_in_process("kl", "quadrature", 0.0)
    norm, kl = train_in_process(divergence, estimator, 1e4)
    assert norm < 0.65 * free_norm, (norm, free_norm)
    assert kl < 0.01 * free_kl, (kl, free_kl)


def test_sampled_js_noise_depends_on_the_sample_alone():
    """Stateless per-sample generators: a resumed run and 2 ranks x batch 1 draw what one process drew."""
    def js_draws(batch_size, rank, world_size):
        generators = rocm_fdiv.js_generators(0, 5, 1, batch_size, rank, "cpu")
        return [torch.randn(3, generator=g) for g in generators]

    together = js_draws(2, 0, 1)
    assert torch.equal(js_draws(1, 0, 2)[0], together[0]) and torch.equal(js_draws(1, 1, 2)[0], together[1])
    assert not torch.equal(together[0], together[1])
    chain_noise = rocm_fdiv.micro_batch(0, PROMPTS, 5, 1, 2, 0, 1, (4, 2, 2), 4, "cpu")[1]
    assert not torch.equal(torch.randn(4, 2, 2, generator=rocm_fdiv.js_generators(0, 5, 1, 2, 0, "cpu")[0]),
                           chain_noise[0])  # a stream apart from the chain noise's


def test_kl_is_one_value_under_both_reductions(lcm):
    """per_dim sums the 1-D marginals' KLs over the latent: the joint KL, so one beta means the same in both."""
    set_lora_b(lcm[2], 0.05)
    with torch.no_grad():
        _, per_dim, kl = rocm_fdiv.sample_chain(lcm[2], *chain_inputs(lcm), "kl", "per_dim")
        _, joint, _ = rocm_fdiv.sample_chain(lcm[2], *chain_inputs(lcm), "kl", "joint")
    assert (per_dim > 0).all() and torch.equal(per_dim, joint) and torch.equal(per_dim, kl)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["per_dim", "joint"])
def test_kl_reproduces_rocm_kl_exactly(tiny, tmp_path, capsys, reduction):
    settings = tiny_main_args(tiny, tmp_path / "kl", beta=0.1).__dict__
    settings = {k: v for k, v in settings.items() if k not in ("exp_name", "divergence", "reduction", "js_estimator")}
    rocm_kl.main(rocm_kl.Args(**settings))
    reference = run_dir_of(capsys.readouterr().out)
    rocm_fdiv.main(tiny_main_args(tiny, tmp_path / "fdiv", beta=0.1, divergence="kl", reduction=reduction))
    ours = run_dir_of(capsys.readouterr().out)
    expected = load_file(reference / "final" / "pytorch_lora_weights.safetensors")
    actual = load_file(ours / "final" / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert any(expected[k].abs().sum() > 0 for k in expected if "lora_B" in k or "lora.up" in k)


def test_unknown_divergence_is_a_one_line_error(tiny, run_script):
    result = run_script("rocm_fdiv.py", *tiny_args(tiny), "--divergence", "hellinga")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: unknown divergence 'hellinga'"), result.stderr[-2000:]
    assert all(name in last_line for name in DIVERGENCES)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
def test_one_step_chain_has_no_divergence_so_beta_is_refused(lcm, divergence):
    """K = 1 has no stochastic step: the divergence is identically 0, also away from the base, so a beta > 0 would
    silently do nothing; it is refused, and beta 0 is allowed."""
    set_lora_b(lcm[2], 0.05)
    with torch.no_grad():
        _, value, kl = rocm_fdiv.sample_chain(lcm[2], *chain_inputs(lcm, num_steps=1), divergence)
    assert torch.equal(value, torch.zeros(2)) and torch.equal(kl, torch.zeros(2))
    args = rocm_fdiv.Args(divergence=divergence, num_inference_steps=1, device="cpu")
    with pytest.raises(SystemExit, match="^error: --num-inference-steps 1 has no stochastic step, so the divergence is "
                                         "0 and --beta has no effect; use --num-inference-steps >= 2 or --beta 0$"):
        rocm_fdiv.validate(args)
    rocm_fdiv.validate(rocm_fdiv.Args(divergence=divergence, num_inference_steps=1, beta=0.0, device="cpu"))


def test_js_estimator_needs_the_js_divergence():
    with pytest.raises(SystemExit, match="^error: --js-estimator applies to --divergence js only"):
        rocm_fdiv.validate(rocm_fdiv.Args(divergence="hellinger", js_estimator="sampled", device="cpu"))
