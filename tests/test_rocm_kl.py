"""rocm_kl.py: the chain against diffusers, checkpointing, the KL at the start, end-to-end runs, bad input."""

import json
from pathlib import Path

import pytest
import torch

import rocm_kl
from tests.conftest import load_tiny, run_dir_of, tiny_args

PROMPTS = ["a cat", "a red apple on a table"]


@pytest.fixture(scope="module")
def lcm(tiny):
    """The tiny pipeline loaded through rocm_kl's own loader, with a LoRA attached."""
    encode, vae, unet, scheduler = load_tiny(rocm_kl, tiny["lcm"])
    rocm_kl.add_lora(unet, rank=4, alpha=4)
    return encode, vae, unet, scheduler


def perturb_lora(unet, seed=0, scale=0.05):
    """Give the zero-initialised LoRA B matrices a value so the policy differs from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def reset_lora(unet):
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.zero_()


def chain_inputs(lcm, num_steps, seed=3, batch=2):
    encode, vae, unet, scheduler = lcm
    schedule = rocm_kl.lcm_schedule(scheduler, num_steps, "cpu")
    latents, noises = rocm_kl.draw_chain_noise((batch, 4, 16, 16), num_steps, torch.Generator().manual_seed(seed), "cpu")
    embeds = encode(PROMPTS[:batch])
    w_embedding = rocm_kl.guidance_embedding(8.5, unet.config.time_cond_proj_dim, batch, "cpu")
    return latents, noises, schedule, embeds, w_embedding


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_chain_matches_the_diffusers_pipeline(tiny, lcm, num_steps):
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    expected = pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=8.5, height=32, width=32,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    reset_lora(lcm[2])
    latents, noises, schedule, embeds, w_embedding = chain_inputs(lcm, num_steps)
    with torch.no_grad():
        final, _ = rocm_kl.sample_chain(lcm[2], latents, noises, schedule, embeds, w_embedding)
    assert (final - expected).abs().max().item() < 1e-6
    image = pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample
    assert torch.allclose(rocm_kl.decode(lcm[1], final), (image / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_timesteps_follow_the_lcm_rule(lcm):
    assert [int(s.t) for s in rocm_kl.lcm_schedule(lcm[3], 8, "cpu")] == [999, 879, 759, 639, 499, 379, 259, 139]
    assert [int(s.t) for s in rocm_kl.lcm_schedule(lcm[3], 4, "cpu")] == [999, 759, 499, 259]


def test_kl_is_exactly_zero_before_the_first_update_and_positive_after(lcm):
    unet = lcm[2]
    reset_lora(unet)
    latents, noises, schedule, embeds, w_embedding = chain_inputs(lcm, 4)
    _, kl = rocm_kl.sample_chain(unet, latents, noises, schedule, embeds, w_embedding, with_kl=True)
    assert torch.equal(kl, torch.zeros(2))
    perturb_lora(unet)
    _, kl = rocm_kl.sample_chain(unet, latents, noises, schedule, embeds, w_embedding, with_kl=True)
    assert (kl > 0).all()


def test_gradients_equal_with_and_without_checkpointing(tiny, lcm):
    from common import load_reward

    unet, vae = lcm[2], lcm[1]
    reward_fn = load_reward("aesthetic", str(tiny["aesthetic"]))
    perturb_lora(unet, seed=1)
    lora = [p for n, p in unet.named_parameters() if p.requires_grad]
    grads = []
    for gradient_checkpointing in (False, True):
        latents, noises, schedule, embeds, w_embedding = chain_inputs(lcm, 4)
        final, kl = rocm_kl.sample_chain(unet, latents, noises, schedule, embeds, w_embedding, with_kl=True,
                                         gradient_checkpointing=gradient_checkpointing)
        loss = rocm_kl.rocm_loss(reward_fn(rocm_kl.decode(vae, final), PROMPTS), kl, 0.5)
        grads.append(torch.autograd.grad(loss, lora))
    assert any(g.abs().sum() > 0 for g in grads[0])
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, rtol=1e-5, atol=1e-8)


def regularized_chain(divergence: str, unet, *chain, **flags):
    """(final latent, per-sample regularizer) of rocm_kl's chain, or of rocm_fdiv's with that divergence (per_dim)."""
    import rocm_fdiv

    if divergence == "rocm_kl":
        return rocm_kl.sample_chain(unet, *chain, with_kl=True, **flags)
    return rocm_fdiv.sample_chain(unet, *chain, divergence, **flags)[:2]


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["rocm_kl", "hellinger", "js", "fisher"])
@pytest.mark.parametrize("reference_grad", [True, False])
def test_regularizer_gradient_is_its_derivative_only_with_reference_grad(tiny, reference_grad, divergence):
    """float64, checkpointing on: autograd's derivative of the summed divergence (rocm_kl's KL, or a
    rocm_fdiv divergence, per_dim) along a random LoRA direction against a central finite difference.
    x_k depends on the LoRA, and so does f_ref(x_k): with the reference a constant at each x_k
    (reference_grad off) the gradient misses that path and is off."""
    encode, vae, unet, scheduler = load_tiny(rocm_kl, tiny["lcm"], torch.float64)
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    lora = rocm_kl.add_lora(unet, rank=4, alpha=4)
    unet.double()
    perturb_lora(unet, scale=0.3)  # away from the base, where the two gradients differ
    latents, noises, schedule, embeds, w_embedding = chain_inputs((encode, vae, unet, scheduler), 4)
    chain = (latents.double(), [noise.double() for noise in noises], schedule, embeds, w_embedding.double())
    generator = torch.Generator().manual_seed(5)
    start = [p.detach().clone() for p in lora]
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in lora]

    def divergence_at(t: float) -> torch.Tensor:
        with torch.no_grad():
            for p, p0, d in zip(lora, start, direction):
                p.copy_(p0 + t * d)
        return regularized_chain(divergence, unet, *chain, reference_grad=reference_grad,
                                 gradient_checkpointing=True)[1].sum()

    grads = torch.autograd.grad(divergence_at(0.0), lora)
    autograd = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    with torch.no_grad():
        h = 1e-4
        finite_difference = ((divergence_at(h) - divergence_at(-h)) / (2 * h)).item()
    error = abs(autograd - finite_difference) / abs(finite_difference)
    if reference_grad:
        assert error < 1e-3, (autograd, finite_difference)  # the divergences are summed in float32
    else:
        assert error > 1e-2, (autograd, finite_difference)


def lora_delta_norm(lora_dir: Path) -> float:
    """Total Frobenius norm of the weight updates B @ A stored in a diffusers-format LoRA file."""
    from safetensors.torch import load_file

    state = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    total = 0.0
    for key, down in state.items():
        if "lora_A" in key or "lora.down" in key:
            up = state[key.replace("lora_A", "lora_B").replace("lora.down", "lora.up")]
            total += (up @ down).norm().item() ** 2
    return total ** 0.5


@pytest.mark.slow
def test_end_to_end_run_saves_a_lora_that_changes_the_pipeline(tiny, run_script):
    from diffusers import LatentConsistencyModelPipeline

    result = run_script("rocm_kl.py", *tiny_args(tiny, steps=3), "--lr", "1e-2", "--beta", "0.1",
                        "--eval-every", "2", "--save-every", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(result.stdout)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/reward" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert all("perf/samples_per_s" in m and "train/kl" in m for m in train)
    assert train[0]["train/kl"] == 0.0 and train[-1]["train/kl"] > 0
    assert [m["step"] for m in metrics if "eval/clipscore" in m] == [0, 2, 3]
    assert (run_dir / "samples" / "step_000003.png").exists() and (run_dir / "checkpoints" / "step_000002" / "training_state.pt").is_file()
    assert "samples/s" in result.stdout

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    kwargs = dict(prompt=PROMPTS, num_inference_steps=4, height=32, width=32, output_type="latent")
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(run_dir / "final")
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow
def test_large_beta_keeps_the_lora_near_the_base(tiny, run_script):
    norms = {}
    for beta in ("0", "1e4"):
        result = run_script("rocm_kl.py", *tiny_args(tiny, steps=10), "--lr", "1e-2", "--beta", beta, "--eval-rewards")
        assert result.returncode == 0, result.stderr[-3000:]
        norms[beta] = lora_delta_norm(run_dir_of(result.stdout) / "final")
    assert norms["1e4"] < 0.5 * norms["0"], norms


@pytest.mark.parametrize("flags,message", [
    (["--reward", "pickscor"], "unknown reward 'pickscor'"),
    (["--model", "/nonexistent/pipeline"], "--model '/nonexistent/pipeline'"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--num-inference-steps", "0"], "--num-inference-steps must be"),
    (["--num-inference-steps", "1"], "--num-inference-steps 1 has no stochastic step, so the KL is 0 and --beta has "
                                     "no effect; use --num-inference-steps >= 2 or --beta 0"),
    (["--resolution", "31"], "--resolution must be a multiple of 2"),
    (["--reward", "jpeg_compressibility"], "needs a differentiable reward"),
    (["--reward", "pickscore=/nonexistent/clip"], "'/nonexistent/clip'"),
])
def test_bad_input_is_a_one_line_error(tiny, run_script, flags, message):
    result = run_script("rocm_kl.py", *tiny_args(tiny), *flags)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_empty_prompts_file_is_a_one_line_error(tiny, run_script, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = run_script("rocm_kl.py", *tiny_args(tiny), "--prompts-file", str(empty))
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and f"'{empty}' has no prompts" in line
