"""Shared pieces of the consistency-model alignment scripts, and only these two:

1. ``gaussian_divergence``: closed forms of f-divergences between two Gaussians with equal
   isotropic std, the per-step policies of a latent consistency model's sampling chain.
2. ``load_reward``: reward models as differentiable functions of decoded images.

Everything else (sampling chain, losses, training loops) lives in each algorithm's own file.
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. f-divergences between N(mean_p, std^2 I) and N(mean_q, std^2 I)
# ---------------------------------------------------------------------------------------------
#
# Everything depends on the squared Mahalanobis distance d2 = ||mean_p - mean_q||^2 / std^2.
# reduction="joint" takes the divergence of the full latent Gaussians (d2 summed over every
# dimension); reduction="per_dim" takes the divergence of each 1-D marginal and sums them over
# the latent, so that both are on one scale (the ROCM paper's: a divergence summed over the
# latent, betas of order 1e-4). For KL, reverse KL and Fisher, which add up over independent
# dimensions, the two are the same value; for the bounded divergences (Hellinger, JS, TV) they
# differ in kind: over 16,384 latent dimensions the joint d2 is large, the joint divergence
# saturates at its bound and its gradient (a factor exp(-d2/8)) vanishes, while the sum of the
# 1-D marginals' divergences keeps pulling. Near the base both are ~ d2/8 for Hellinger and JS.

DIVERGENCES = ("kl", "reverse_kl", "hellinger", "js", "fisher", "tv", "chi2", "none")
REDUCTIONS = ("joint", "per_dim")
JS_ESTIMATORS = ("quadrature", "sampled")

_GAUSS_HERMITE_POINTS = 96


@lru_cache(maxsize=None)
def _standard_normal_quadrature(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights with sum(w * g(z)) ~= E_{z ~ N(0,1)} g(z) (Gauss-Hermite, rescaled)."""
    nodes, weights = np.polynomial.hermite.hermgauss(num_points)
    return nodes * math.sqrt(2.0), weights / math.sqrt(math.pi)


def _safe_sqrt(d2: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite (zero) gradient at 0, where the divergences below are flat anyway."""
    return torch.where(d2 > 0, d2.clamp_min(1e-30).sqrt(), torch.zeros_like(d2))


def _js_from_d2(d2: torch.Tensor) -> torch.Tensor:
    """Exact JS(p||q) of equal-variance Gaussians at squared separation d2, any shape.

    Along the line joining the means the log-ratio log q/p at x = mean_p + std * z is
    -d z - d2 / 2 with d = sqrt(d2), so JS = E_z [log 2 - softplus(-d z - d2 / 2)], a 1-D integral.
    Integrating log 2 - softplus(.) rather than subtracting afterwards makes JS exactly 0 at d2 = 0.
    The integral runs in float64: near d2 = 0 the integrand is a small difference of two O(1)
    numbers, and in float32 its rounding (~1e-8 per node) swamps JS ~ d2/8 and its gradient once
    the gap is below ~1e-3 std.
    """
    nodes, weights = _standard_normal_quadrature(_GAUSS_HERMITE_POINTS)
    d2_64 = d2.double()
    z = torch.as_tensor(nodes, dtype=torch.float64, device=d2.device)
    w = torch.as_tensor(weights, dtype=torch.float64, device=d2.device)
    integrand = math.log(2.0) - F.softplus(-_safe_sqrt(d2_64).unsqueeze(-1) * z - d2_64.unsqueeze(-1) / 2)
    return (integrand * w).sum(-1).clamp_min(0.0).to(d2.dtype)


def _js_sampled(delta_over_std: torch.Tensor, reduction: str, generator: torch.Generator | None):
    """The sampled JS estimate (one draw per sample, antithetic pair), as in the ROCM paper.

    x ~ p gives log q/p = -<z, delta> - d2/2; x ~ q (same z) gives log p/q = <z, delta> - d2/2.
    """
    z = torch.randn(delta_over_std.shape, generator=generator, device=delta_over_std.device,
                    dtype=delta_over_std.dtype)
    if reduction == "joint":
        projection = (z * delta_over_std).flatten(1).sum(1)
        half_d2 = delta_over_std.flatten(1).square().sum(1) / 2
        return math.log(2.0) - 0.5 * (F.softplus(-projection - half_d2) + F.softplus(projection - half_d2))
    projection = z * delta_over_std
    half_d2 = delta_over_std.square() / 2
    per_dim = math.log(2.0) - 0.5 * (F.softplus(-projection - half_d2) + F.softplus(projection - half_d2))
    return per_dim.flatten(1).sum(1)


def gaussian_divergence(
    name: str,
    mean_p: torch.Tensor,
    mean_q: torch.Tensor,
    std: torch.Tensor | float,
    reduction: str = "joint",
    js_estimator: str = "quadrature",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """D(p || q) for p = N(mean_p, std^2 I), q = N(mean_q, std^2 I), one value per sample.

    mean_p, mean_q: (B, ...) tensors; std: a float or a tensor broadcastable to them (e.g. (B,1,1,1)).
    name: one of DIVERGENCES.
      kl          KL(p||q) = d2 / 2
      reverse_kl  KL(q||p); identical to kl for equal variances (kept so tables read naturally)
      hellinger   squared Hellinger distance 1 - BC = 1 - exp(-d2 / 8), in [0, 1]
      js          Jensen-Shannon, in [0, log 2]; exact by quadrature or the paper's sampled estimate
      fisher      E_p ||grad log p - grad log q||^2 = ||mean_p - mean_q||^2 / std^4 (not scale invariant)
      tv          total variation erf(sqrt(d2) / (2 sqrt 2)), in [0, 1]
      chi2        chi-squared exp(d2) - 1 (explodes quickly: use per_dim)
      none        zero (the unregularized baseline)
    reduction: "joint" (the latent vector as one Gaussian) or "per_dim" (sum of the 1-D marginals'
      divergences over the latent); the two are equal for kl, reverse_kl and fisher.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}'; choose one of: {', '.join(DIVERGENCES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}'; choose one of: {', '.join(REDUCTIONS)}")
    if js_estimator not in JS_ESTIMATORS:
        raise ValueError(f"unknown JS estimator '{js_estimator}'; choose one of: {', '.join(JS_ESTIMATORS)}")
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean shapes differ: {tuple(mean_p.shape)} vs {tuple(mean_q.shape)}")

    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    delta_over_std = (mean_p - mean_q) / std
    if name == "none":
        return mean_p.new_zeros(mean_p.shape[0])
    if name == "js" and js_estimator == "sampled":
        return _js_sampled(delta_over_std, reduction, generator)
    if name == "fisher":
        return (delta_over_std / std).square().flatten(1).sum(1)

    d2 = delta_over_std.square()
    # kl adds up over dimensions: per_dim takes the joint path, so the two reductions agree bit for bit
    summed_first = reduction == "joint" or name in ("kl", "reverse_kl")
    d2 = d2.flatten(1).sum(1) if summed_first else d2
    if name in ("kl", "reverse_kl"):
        value = d2 / 2
    elif name == "hellinger":
        value = -torch.expm1(-d2 / 8)
    elif name == "js":
        value = _js_from_d2(d2)
    elif name == "tv":
        value = torch.erf(_safe_sqrt(d2) / (2 * math.sqrt(2.0)))
    else:  # chi2
        value = torch.expm1(d2)
    return value if summed_first else value.flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# 2. Reward models
# ---------------------------------------------------------------------------------------------
#
# A reward is a frozen nn.Module called as reward(images, prompts) -> (B,) with images in [0, 1],
# shape (B, 3, H, W). Preprocessing runs on tensors (resize, crop, normalize) so gradients reach
# the images; PIL-based processors would cut the graph and shift scores (~0.1 PickScore).

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# name -> (default weights, default tokenizer source)
REWARD_DEFAULTS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    # HPSv2 v2.0 converted to transformers' CLIPModel (the open_clip original needs open_clip).
    "hpsv2": ("adams-story/HPSv2-hf", "adams-story/HPSv2-hf"),
    "clipscore": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "aesthetic": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "imagereward": ("ImageReward-v1.0", None),
    "jpeg_compressibility": (None, None),
    "jpeg_incompressibility": (None, None),
}
REWARDS = tuple(REWARD_DEFAULTS)
DIFFERENTIABLE_REWARDS = ("pickscore", "hpsv2", "clipscore", "aesthetic")

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable CLIP preprocessing: clamp, bicubic resize of the short side, center crop, normalize."""
    images = images.clamp(0, 1)
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new_size != (height, width):
        images = F.interpolate(images, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    images = images[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def missing_local_directory(path: str) -> str | None:
    """Why `path`, written as a local directory, is not one ("does not exist", "is not a directory"); None otherwise.

    A hub id is "name" or "org/name"; a path starting with / . ~, with more than one '/', with a
    backslash, or whose first part is a local directory cannot be one, so the hub's "Repo id must
    be in the form..." would only hide a mistyped local directory.
    """
    local = (path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
             or ("/" in path and os.path.isdir(path.split("/")[0])))
    if not local or os.path.isdir(path):  # no ~ expansion: the loaders do not expand it either
        return None
    return "is not a directory" if os.path.exists(path) else "does not exist"


def _tokenizer_source(name: str, path: str) -> str:
    """Local directories carry their own tokenizer; hub weights without one use the default."""
    if os.path.isdir(path):
        tokenizer_files = ("tokenizer_config.json", "vocab.json", "tokenizer.json")
        if any(os.path.exists(os.path.join(path, file)) for file in tokenizer_files):
            return path
    elif path != REWARD_DEFAULTS[name][0]:
        return path
    return REWARD_DEFAULTS[name][1]


class ClipReward(nn.Module):
    """Score from a CLIP-style dual encoder: pickscore, hpsv2, clipscore, aesthetic."""

    differentiable = True

    def __init__(self, name: str, clip_model, tokenizer, aesthetic_head: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.aesthetic_head = aesthetic_head
        self.image_size = clip_model.config.vision_config.image_size
        # PickScore's temperature, read while the model is still fp32: bf16 stores log(100) as 4.594,
        # whose exp is 99.0, which would shift every PickScore by -1%
        self.logit_scale = clip_model.logit_scale.detach().float().exp().item()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.float(), self.image_size).to(self.clip.dtype)
        embeds = self.clip.get_image_features(pixel_values=pixels)
        embeds = getattr(embeds, "pooler_output", embeds)
        return F.normalize(embeds.float(), dim=-1)

    @staticmethod
    def diversity(image_embeds: torch.Tensor, samples_per_prompt: int) -> float:
        """Mean pairwise cosine distance (1 - cos) between the samples of each prompt, in [0, 2]: 0 when they are
        alike. image_embeds: (prompts x samples_per_prompt, D), a prompt's samples in a row. For n unit vectors u
        the mean over pairs is n / (n - 1) (1 - |mean u|^2), so no n x n matrix is needed."""
        unit = F.normalize(image_embeds.double(), dim=-1).unflatten(0, (-1, samples_per_prompt))
        spread = 1 - unit.mean(1).square().sum(-1)
        return (samples_per_prompt / (samples_per_prompt - 1) * spread).mean().clamp(0, 2).item()

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        max_length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt").to(device)
        embeds = self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        embeds = getattr(embeds, "pooler_output", embeds)
        return F.normalize(embeds.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = self.image_embeds(images)
        if self.name == "aesthetic":
            return self.aesthetic_head(image.to(next(self.aesthetic_head.parameters()).dtype)).squeeze(-1).float()
        cosine = (image * self.text_embeds(prompts)).sum(-1)
        if self.name == "pickscore":
            return self.logit_scale * cosine
        if self.name == "clipscore":
            return 2.5 * cosine.clamp_min(0.0)  # Hessel et al. 2021, w = 2.5
        return cosine  # hpsv2: the raw cosine, no logit scale


def aesthetic_mlp(in_features: int) -> nn.Sequential:
    """The LAION aesthetic predictor v2 head. It has no activations: dropout only, so eval() makes it linear."""
    return nn.Sequential(
        nn.Linear(in_features, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def _load_aesthetic_head(path: str) -> nn.Module:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, AESTHETIC_HEAD_FILE)):
        head_file = os.path.join(path, AESTHETIC_HEAD_FILE)
    else:
        from huggingface_hub import hf_hub_download
        head_file = hf_hub_download(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE)
    state = torch.load(head_file, map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    head = aesthetic_mlp(state["0.weight"].shape[1])
    head.load_state_dict(state)
    return head


class JpegReward(nn.Module):
    """Size of the image as a quality-95 JPEG in kB: negated (compressibility) or not. No gradient."""

    differentiable = False

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.sign = -1.0 if name == "jpeg_compressibility" else 1.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, device=images.device)


class ImageRewardReward(nn.Module):
    """ImageReward (Xu et al. 2023) through its own package, for evaluation. No gradient."""

    differentiable = False

    def __init__(self, model):
        super().__init__()
        self.name = "imagereward"
        self.model = model

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # The package's score() already applies the published normalization (r - 0.1672) / 1.0333.
        scores = [float(self.model.score(prompt, Image.fromarray(array))) for prompt, array in zip(prompts, pixels)]
        return torch.tensor(scores, device=images.device)


def load_reward(name: str, path: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a frozen reward model: reward(images in [0,1] (B,3,H,W), prompts) -> rewards (B,).

    name: one of REWARDS. path: a hub id or a local directory in the model's own on-disk format
    (transformers CLIPModel save_pretrained; for aesthetic, the CLIP directory may also hold the
    LAION head file sac+logos+ava1-l14-linearMSE.pth). None uses the hub defaults in REWARD_DEFAULTS.
    The returned module has .name and .differentiable.
    """
    if name not in REWARD_DEFAULTS:
        raise ValueError(f"unknown reward '{name}'; choose one of: {', '.join(REWARDS)}")
    path = path or REWARD_DEFAULTS[name][0]

    if name.startswith("jpeg_"):
        reward = JpegReward(name)
    elif name == "imagereward":
        try:
            import ImageReward as image_reward_package
        except ImportError as error:
            raise ImportError("reward 'imagereward' needs its package: pip install image-reward") from error
        reward = ImageRewardReward(image_reward_package.load(path, device=str(device)))
    else:
        from transformers import AutoTokenizer, CLIPModel

        problem = missing_local_directory(path)
        if problem:
            raise FileNotFoundError(f"could not load reward '{name}': directory '{path}' {problem}; pass an existing "
                                    f"local directory as {name}=DIR or a hub id")
        try:
            clip = CLIPModel.from_pretrained(path, torch_dtype=torch.float32)  # cast below, after the logit scale
            tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(name, path))
            head = _load_aesthetic_head(path) if name == "aesthetic" else None
        except Exception as error:  # hub errors come in many types; all mean the same to the user
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise FileNotFoundError(
                f"could not load reward '{name}' from '{path}' ({first_line}); pass a local directory "
                f"as {name}=DIR or make the hub reachable") from error
        reward = ClipReward(name, clip, tokenizer, head)
        clip.to(dtype)

    reward.requires_grad_(False)
    return reward.eval().to(device)
