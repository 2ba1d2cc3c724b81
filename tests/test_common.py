"""common.py: divergence closed forms against Monte Carlo, their limits, and the reward loaders."""

import math
import zlib

import pytest
import torch

from common import DIVERGENCES, ClipReward, gaussian_divergence, load_reward, missing_local_directory

CLOSED_FORMS = [name for name in DIVERGENCES if name != "none"]
NUM_SAMPLES = 400_000


def monte_carlo(name: str, mean_p: torch.Tensor, mean_q: torch.Tensor, std: float, generator) -> torch.Tensor:
    """The divergence of N(mean_p, std^2 I) from N(mean_q, std^2 I) from its definition, by sampling (float64)."""
    p = torch.distributions.Normal(mean_p, std)
    q = torch.distributions.Normal(mean_q, std)
    x_p = mean_p + std * torch.randn((NUM_SAMPLES, *mean_p.shape), generator=generator, dtype=torch.float64)
    x_q = mean_q + std * torch.randn((NUM_SAMPLES, *mean_p.shape), generator=generator, dtype=torch.float64)
    log_p, log_q = p.log_prob(x_p).sum(-1), q.log_prob(x_p).sum(-1)
    if name in ("kl",):
        return (log_p - log_q).mean()
    if name == "reverse_kl":
        return (q.log_prob(x_q).sum(-1) - p.log_prob(x_q).sum(-1)).mean()
    if name == "hellinger":
        return 1 - torch.exp((log_q - log_p) / 2).mean()
    if name == "js":
        log_m_at_p = torch.logaddexp(log_p, log_q) - math.log(2)
        lp_q, lq_q = p.log_prob(x_q).sum(-1), q.log_prob(x_q).sum(-1)
        log_m_at_q = torch.logaddexp(lp_q, lq_q) - math.log(2)
        return 0.5 * (log_p - log_m_at_p).mean() + 0.5 * (lq_q - log_m_at_q).mean()
    if name == "fisher":
        x = x_p[:2000].clone().requires_grad_(True)
        score_gap = torch.autograd.grad((p.log_prob(x) - q.log_prob(x)).sum(), x)[0]
        return score_gap.square().sum(-1).mean()
    if name == "tv":
        # E_p[(1 - q/p)+] is TV and bounded, unlike 0.5 E_p|1 - q/p| whose ratio is heavy-tailed
        return (1 - torch.exp(log_q - log_p)).clamp(min=0).mean()
    if name == "chi2":
        return torch.exp(log_p - log_q).mean() - 1
    raise AssertionError(name)


@pytest.mark.parametrize("name", CLOSED_FORMS)
@pytest.mark.parametrize("dims,std", [(1, 0.5), (3, 1.3), (8, 0.8)])
def test_joint_matches_monte_carlo(name, dims, std):
    # a fixed seed per case: hash() of a str changes with every interpreter (PYTHONHASHSEED)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}-{dims}".encode()))
    mean_p = torch.randn(dims, generator=generator, dtype=torch.float64) * std * 0.4
    mean_q = torch.randn(dims, generator=generator, dtype=torch.float64) * std * 0.4
    closed = gaussian_divergence(name, mean_p[None], mean_q[None], std, reduction="joint")[0]
    estimate = monte_carlo(name, mean_p, mean_q, std, generator)
    assert closed == pytest.approx(estimate.item(), rel=0.03, abs=2e-3)


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_per_dim_is_the_sum_of_one_dimensional_divergences(name):
    generator = torch.Generator().manual_seed(7)
    mean_p = torch.randn(2, 5, generator=generator, dtype=torch.float64) * 0.6
    mean_q = torch.randn(2, 5, generator=generator, dtype=torch.float64) * 0.6
    per_dim = gaussian_divergence(name, mean_p, mean_q, 0.9, reduction="per_dim")
    for b in range(2):
        one_d = [gaussian_divergence(name, mean_p[b, i].view(1, 1), mean_q[b, i].view(1, 1), 0.9)[0] for i in range(5)]
        assert per_dim[b] == pytest.approx(torch.stack(one_d).sum().item(), rel=1e-9)
    # ... and each 1-D marginal agrees with sampling
    one_d_mc = monte_carlo(name, mean_p[0, :1], mean_q[0, :1], 0.9, generator)
    one_d_closed = gaussian_divergence(name, mean_p[:1, :1], mean_q[:1, :1], 0.9, reduction="per_dim")[0]
    assert one_d_closed == pytest.approx(one_d_mc.item(), rel=0.03, abs=2e-3)


def test_per_dim_and_joint_are_on_one_scale():
    """One beta scale: kl, reverse_kl and fisher add up over dimensions, so both reductions give the same
    value (kl bit for bit, as rocm_kl.py computes it); near the base hellinger and js agree too, ~ d2/8."""
    generator = torch.Generator().manual_seed(3)
    mean_p, mean_q = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(2))
    for name in ("kl", "reverse_kl"):
        assert torch.equal(gaussian_divergence(name, mean_p, mean_q, 0.7, reduction="per_dim"),
                           gaussian_divergence(name, mean_p, mean_q, 0.7, reduction="joint"))
    assert torch.allclose(gaussian_divergence("fisher", mean_p, mean_q, 0.7, reduction="per_dim"),
                          gaussian_divergence("fisher", mean_p, mean_q, 0.7, reduction="joint"), rtol=1e-6)
    near = mean_q.double() + 1e-3 * mean_p.double()  # joint d2 ~ 5e-4: far from saturation
    for name in ("hellinger", "js"):
        per_dim, joint = (gaussian_divergence(name, near, mean_q.double(), 0.7, reduction=r) for r in ("per_dim", "joint"))
        assert torch.allclose(per_dim, joint, rtol=1e-3)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["joint", "per_dim"])
def test_zero_at_equal_means_with_zero_gradient(name, reduction):
    mean = torch.randn(3, 4, 8, 8, requires_grad=True)
    value = gaussian_divergence(name, mean, mean.detach().clone(), 0.3, reduction=reduction)
    assert value.shape == (3,)
    assert torch.equal(value, torch.zeros(3))
    if value.requires_grad:
        (grad,) = torch.autograd.grad(value.sum(), mean)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_small_separation_limits():
    mean_p = torch.zeros(1, 64, dtype=torch.float64)
    mean_q = torch.full((1, 64), 1e-3, dtype=torch.float64)
    d2 = 64 * 1e-6
    assert gaussian_divergence("kl", mean_p, mean_q, 1.0)[0] == pytest.approx(d2 / 2, rel=1e-9)
    assert gaussian_divergence("hellinger", mean_p, mean_q, 1.0)[0] == pytest.approx(d2 / 8, rel=1e-4)
    assert gaussian_divergence("js", mean_p, mean_q, 1.0)[0] == pytest.approx(d2 / 8, rel=1e-3)
    assert gaussian_divergence("tv", mean_p, mean_q, 1.0)[0] == pytest.approx(math.sqrt(d2 / (2 * math.pi)), rel=1e-3)
    assert gaussian_divergence("chi2", mean_p, mean_q, 1.0)[0] == pytest.approx(d2, rel=1e-4)


@pytest.mark.parametrize("gap", [1e-5, 1e-4, 1e-3])
def test_js_quadrature_is_accurate_near_the_base_in_float32(gap):
    """The training path's dtype: per_dim JS of a 4x64x64 latent, value and gradient, both ~ d2/8 there."""
    mean_p = torch.full((1, 4, 64, 64), gap, requires_grad=True)
    value = gaussian_divergence("js", mean_p, torch.zeros(1, 4, 64, 64), 1.0, reduction="per_dim")
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(mean_p.numel() * gap**2 / 8, rel=1e-3)
    (grad,) = torch.autograd.grad(value.sum(), mean_p)
    assert torch.allclose(grad, torch.full_like(grad, gap / 4), rtol=1e-3)


def test_kl_equals_reverse_kl_and_fisher_scales_with_std():
    mean_p, mean_q = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.allclose(gaussian_divergence("kl", mean_p, mean_q, 0.7), gaussian_divergence("reverse_kl", mean_p, mean_q, 0.7))
    # Fisher is not scale invariant: scaling means and std by c divides it by c^2; KL does not change.
    fisher, fisher_scaled = (gaussian_divergence("fisher", c * mean_p, c * mean_q, c * 0.7) for c in (1.0, 3.0))
    assert torch.allclose(fisher_scaled, fisher / 9)
    assert torch.allclose(gaussian_divergence("kl", 3 * mean_p, 3 * mean_q, 2.1), gaussian_divergence("kl", mean_p, mean_q, 0.7))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["joint", "per_dim"])
def test_gradient_finite_at_large_separation(name, reduction):
    """Over a 4x64x64 latent the joint d2 is huge: bounded divergences saturate but stay finite.

    chi2 = exp(d2) - 1 is the exception by nature: it overflows jointly, so it is checked per
    dimension at a separation where exp(d2) is representable.
    """
    scale = 0.3 if name == "chi2" else 3.0
    mean_p = (torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * scale).requires_grad_(True)
    value = gaussian_divergence(name, mean_p, torch.zeros(2, 4, 64, 64), 0.5, reduction=reduction)
    if name == "chi2" and reduction == "joint":
        assert torch.isinf(value).all()
        return
    assert torch.isfinite(value).all()
    if value.requires_grad:
        (grad,) = torch.autograd.grad(value.sum(), mean_p)
        assert torch.isfinite(grad).all()
    if name in ("hellinger", "tv") and reduction == "joint":
        assert torch.allclose(value, torch.ones(2))
    if name == "js" and reduction == "joint":
        assert torch.allclose(value, torch.full((2,), math.log(2)))


@pytest.mark.parametrize("reduction", ["joint", "per_dim"])
def test_sampled_js_is_unbiased(reduction):
    generator = torch.Generator().manual_seed(0)
    mean_p = torch.randn(1, 6, dtype=torch.float64) * 0.8
    mean_q = torch.randn(1, 6, dtype=torch.float64) * 0.8
    exact = gaussian_divergence("js", mean_p, mean_q, 1.1, reduction=reduction)
    draws = gaussian_divergence("js", mean_p.expand(200_000, 6), mean_q.expand(200_000, 6), 1.1, reduction=reduction,
                                js_estimator="sampled", generator=generator)
    assert draws.mean().item() == pytest.approx(exact.item(), rel=0.01)


def test_bad_names_raise_with_the_valid_choices():
    m = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="hellinger"):
        gaussian_divergence("hellinge", m, m, 1.0)
    with pytest.raises(ValueError, match="per_dim"):
        gaussian_divergence("kl", m, m, 1.0, reduction="sum")


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------

PROMPTS = ["a red apple on a table", "a cat"]


def reward_path(tiny, name):
    return str(tiny["aesthetic"] if name == "aesthetic" else tiny["clip"])


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "clipscore", "aesthetic"])
def test_differentiable_rewards_have_finite_nonzero_image_gradients(tiny, name):
    reward = load_reward(name, reward_path(tiny, name))
    assert reward.differentiable
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_diversity_is_the_mean_pairwise_cosine_distance_in_0_2():
    """eval/diversity's measure: 0 for identical samples, 2 for opposite ones, else the pairs' mean of 1 - cos."""
    embeds = torch.randn(5 * 3, 8, generator=torch.Generator().manual_seed(0))  # 5 prompts x 3 samples
    per_prompt = torch.nn.functional.normalize(embeds, dim=-1).view(5, 3, 8)
    pairs = [1 - (p[i] @ p[j]) for p in per_prompt for i in range(3) for j in range(3) if i != j]
    assert ClipReward.diversity(embeds, 3) == pytest.approx(torch.stack(pairs).mean().item(), abs=1e-6)
    assert 0 < ClipReward.diversity(embeds, 3) < 2
    same = embeds[::3].repeat_interleave(4, 0)  # each prompt's 4 samples alike
    assert ClipReward.diversity(same, 4) == pytest.approx(0.0, abs=1e-9)
    assert ClipReward.diversity(3 * same, 4) == pytest.approx(0.0, abs=1e-9)  # scale does not matter
    opposite = torch.stack([embeds[:5], -2 * embeds[:5]], 1).flatten(0, 1)
    assert ClipReward.diversity(opposite, 2) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "clipscore"])
def test_clip_scores_follow_their_definitions(tiny, name):
    """Each score against transformers' own CLIPModel forward on the same preprocessed pixels."""
    from transformers import AutoTokenizer, CLIPModel

    from common import clip_preprocess

    reward = load_reward(name, reward_path(tiny, name))
    model, tokenizer = CLIPModel.from_pretrained(reward_path(tiny, name)), AutoTokenizer.from_pretrained(reward_path(tiny, name))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=clip_preprocess(images, 32))
        cosine = torch.diagonal(out.logits_per_image) / model.logit_scale.exp()
        expected = {"pickscore": model.logit_scale.exp() * cosine, "hpsv2": cosine,
                    "clipscore": 2.5 * cosine.clamp_min(0)}[name]
        assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)


def test_pickscore_keeps_its_fp32_logit_scale_under_bf16(tiny, tmp_path):
    """The real PickScore's scale is exp(log 100) = 100; stored in bf16 it would become exp(4.594) = 99.0."""
    import shutil

    from transformers import CLIPModel

    shutil.copytree(tiny["clip"], tmp_path / "clip")
    model = CLIPModel.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model.save_pretrained(tmp_path / "clip")
    reward = load_reward("pickscore", str(tmp_path / "clip"), dtype=torch.bfloat16)
    assert next(reward.clip.parameters()).dtype == torch.bfloat16
    assert reward.logit_scale == pytest.approx(100.0, rel=1e-6)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cosine = (reward.image_embeds(images) * reward.text_embeds(PROMPTS)).sum(-1)
        assert torch.allclose(reward(images, PROMPTS), 100.0 * cosine)


def test_aesthetic_is_the_laion_head_on_normalized_image_embeddings(tiny):
    from common import AESTHETIC_HEAD_FILE, aesthetic_mlp

    reward = load_reward("aesthetic", reward_path(tiny, "aesthetic"))
    state = torch.load(tiny["aesthetic"] / AESTHETIC_HEAD_FILE, weights_only=True)
    head = aesthetic_mlp(state["layers.0.weight"].shape[1])
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        embeds = reward.image_embeds(images)
        assert torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(reward(images, ["x"] * 3), head.eval()(embeds).squeeze(-1), atol=1e-6)


def test_jpeg_rewards_rank_noise_and_flat_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    compressibility = load_reward("jpeg_compressibility")
    incompressibility = load_reward("jpeg_incompressibility")
    assert not compressibility.differentiable
    assert compressibility(flat, [""]) > compressibility(noise, [""])
    assert incompressibility(noise, [""]) > incompressibility(flat, [""])
    assert torch.equal(incompressibility(noise, [""]), -compressibility(noise, [""]))


def test_reward_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="choose one of: pickscore"):
        load_reward("pickscor")
    with pytest.raises(FileNotFoundError, match="pickscore=DIR"):
        load_reward("pickscore", str(tmp_path / "missing"))
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install image-reward"):
            load_reward("imagereward")


def test_a_missing_local_reward_directory_is_named_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as raised:
        load_reward("clipscore", str(tmp_path / "missing"))
    assert f"directory '{tmp_path / 'missing'}' does not exist" in str(raised.value)
    assert "Repo id" not in str(raised.value)
    (tmp_path / "weights.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert missing_local_directory(str(tmp_path / "weights.bin")) == "is not a directory"
    for path in ["./clip", "../clip", "~/clip", "/clip", "a/b/c", "models/clip", "C:\\clip"]:
        assert missing_local_directory(path) == "does not exist", path
    for hub_id_or_directory in ["openai/clip-vit-large-patch14", "clip", str(tmp_path), "models", "./models"]:
        assert missing_local_directory(hub_id_or_directory) is None, hub_id_or_directory
