"""Data and evaluation-only metrics of the digits world (see world/build_digits_world.py).

Importing this module has no side effects: scikit-learn's digits are read, and the classifier
is loaded, only when a function needs them.

    real_digits(split)                      real 32x32 RGB digits in [0, 1] and their captions
    load_classifier(path)                   the held-out CNN digit classifier (DigitClassifier)
    digit_accuracy(images, prompts)         fraction of images classified as the digit their prompt names
    frechet_distance(images, reference)     Frechet distance in the classifier's penultimate feature space

The classifier is trained only on real digits, with its own seed and architecture, and no
model of the world (LCM, CLIP, aesthetic head) ever sees it: it is a judge, not a reward.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WORLD_DIR = Path(__file__).resolve().parent / "digits"
DEFAULT_CLASSIFIER = WORLD_DIR / "classifier.pt"

RESOLUTION = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLE_WORDS = ("thin", "", "thick")  # by ink mass, terciles of the whole data set; "" = medium, no word
PAPER = (0.96, 0.94, 0.88)  # cream background
INK = (0.10, 0.16, 0.42)  # navy ink
EVAL_EVERY = 5  # images with index % 5 == 0 are held out for evaluation (360 of 1,797)

_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def caption(digit: int, style: str = "") -> str:
    """'a handwritten digit seven', 'a thick handwritten digit seven', 'a thin handwritten digit seven'."""
    return " ".join(word for word in ("a", style, "handwritten", "digit", DIGIT_WORDS[digit]) if word)


def all_captions() -> list[str]:
    return [caption(digit, style) for digit in range(10) for style in STYLE_WORDS]


def prompt_split() -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts): per digit one style is held out (style index = digit % 3).

    Every caption occurs in the world's own training data; the split only separates the prompts
    an alignment run trains on from the prompts it is evaluated on.
    """
    train, held_out = [], []
    for digit in range(10):
        for index, style in enumerate(STYLE_WORDS):
            (held_out if index == digit % 3 else train).append(caption(digit, style))
    return train, held_out


def digit_of(prompt: str) -> int:
    """The digit a prompt names (its first digit word); ValueError if it names none."""
    match = _DIGIT_PATTERN.search(prompt.lower())
    if match is None:
        raise ValueError(f"prompt names no digit word ({', '.join(DIGIT_WORDS)}): '{prompt}'")
    return DIGIT_WORDS.index(match.group(1))


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def ink_mass(ink: torch.Tensor) -> torch.Tensor:
    """Mean ink coverage of (N, H, W) ink maps in [0, 1]: the stroke-thickness property."""
    return ink.flatten(1).mean(1)


def _style_thresholds() -> tuple[float, float]:
    ink, _ = _raw_digits()
    mass = ink.reshape(len(ink), -1).mean(1)
    low, high = np.quantile(mass, [1 / 3, 2 / 3])
    return float(low), float(high)


def render(ink8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) ink in [0, 1] -> (N, 3, 32, 32) RGB in [0, 1]: bilinear upscale, navy ink on cream paper."""
    ink = F.interpolate(ink8[:, None].float(), size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    ink = ink.clamp(0, 1)
    paper = torch.tensor(PAPER).view(1, 3, 1, 1)
    colour = torch.tensor(INK).view(1, 3, 1, 1)
    return paper * (1 - ink) + colour * ink


def ink_of_images(images: torch.Tensor) -> torch.Tensor:
    """Invert render(): the ink map (N, H, W) of RGB images, by projection onto the paper-to-ink line."""
    paper = torch.tensor(PAPER, device=images.device).view(1, 3, 1, 1)
    direction = torch.tensor(INK, device=images.device).view(1, 3, 1, 1) - paper
    return (((images.float() - paper) * direction).sum(1) / direction.square().sum()).clamp(0, 1)


def real_digits(split: str = "eval") -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(images (N, 3, 32, 32) in [0, 1], captions, digit labels) of the real digits of a split.

    split: "eval" (every 5th image, 360), "train" (the other 1,437) or "all".
    Captions carry a stroke-thickness word from the ink mass of the 8x8 original.
    """
    if split not in ("eval", "train", "all"):
        raise ValueError(f"split must be 'eval', 'train' or 'all' (got '{split}')")
    ink, labels = _raw_digits()
    index = np.arange(len(ink))
    keep = {"eval": index % EVAL_EVERY == 0, "train": index % EVAL_EVERY != 0, "all": index >= 0}[split]
    ink, labels = torch.from_numpy(ink[keep]), torch.from_numpy(labels[keep])
    low, high = _style_thresholds()
    mass = ink_mass(ink)
    styles = [STYLE_WORDS[0] if m < low else STYLE_WORDS[2] if m > high else STYLE_WORDS[1] for m in mass.tolist()]
    captions = [caption(int(d), s) for d, s in zip(labels.tolist(), styles)]
    return render(ink), captions, labels


# ---------------------------------------------------------------------------------------------
# Held-out classifier
# ---------------------------------------------------------------------------------------------

class DigitClassifier(nn.Module):
    """A small CNN on 32x32 RGB: stride-2 stem, three conv stages (16, 8, 4 px), global average pool
    (the 128-d feature used for Frechet distances), linear head."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.stages = nn.Sequential(nn.Conv2d(3, width, 4, stride=2, padding=1), block(width, width), nn.MaxPool2d(2),
                                    block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, feature_dim))
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1] (any size; resized to 32x32)."""
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = F.interpolate(images.float(), size=(RESOLUTION, RESOLUTION), mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.stages(images.float().clamp(0, 1) * 2 - 1).mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER, device: str | torch.device = "cpu") -> DigitClassifier:
    """The frozen classifier from its state dict (world/digits/classifier.pt)."""
    model = DigitClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.requires_grad_(False)
    return model.eval().to(device)


@lru_cache(maxsize=4)
def _cached_classifier(path: str) -> DigitClassifier:
    return load_classifier(path)


def _classifier(classifier) -> DigitClassifier:
    if classifier is None:
        return _cached_classifier(str(DEFAULT_CLASSIFIER))
    if isinstance(classifier, (str, Path)):
        return _cached_classifier(str(classifier))
    return classifier


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classify(images: torch.Tensor, classifier=None) -> torch.Tensor:
    """Predicted digits (N,) of images (N, 3, H, W) in [0, 1]."""
    model = _classifier(classifier)
    device = next(model.parameters()).device
    return _batched(lambda x: model(x.to(device)).argmax(-1).cpu(), images.detach())


def digit_accuracy(images: torch.Tensor, prompts: Sequence[str], classifier=None) -> float:
    """Fraction of images (N, 3, H, W) in [0, 1] that the classifier reads as the digit their prompt names."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    targets = torch.tensor([digit_of(p) for p in prompts])
    return (classify(images, classifier) == targets).float().mean().item()


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier=None) -> torch.Tensor:
    model = _classifier(classifier)
    device = next(model.parameters()).device
    return _batched(lambda x: model.features(x.to(device)).cpu(), images.detach()).double()


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr sqrt(A B) for PSD A, B, as tr sqrt(sqrt(A) B sqrt(A)) via symmetric eigendecompositions."""
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    return float(np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum())


def frechet_distance(images: torch.Tensor, reference_images: torch.Tensor, classifier=None) -> float:
    """Frechet distance between Gaussians fitted to the classifier features of two image sets.

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over the 128-d penultimate features
    (an FID in miniature). Small sets give biased (larger) values: compare equal-sized sets.
    """
    a = classifier_features(images, classifier).numpy()
    b = classifier_features(reference_images, classifier).numpy()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 images per set")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    value = np.square(mean_a - mean_b).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * _trace_sqrt_product(cov_a, cov_b)
    return float(max(value, 0.0))
