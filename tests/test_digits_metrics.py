"""world/digits_metrics.py: the real digits, prompt parsing and the Frechet distance (no trained weights needed)."""

import pytest
import torch

from world.digits_metrics import DIGIT_WORDS, DigitClassifier, digit_accuracy, digit_of, frechet_distance, real_digits


def test_real_digits_are_rgb_images_with_matching_captions():
    images, captions, labels = real_digits("eval")
    assert images.shape[1:] == (3, 32, 32) and len(images) == len(captions) == len(labels) == 360
    assert 0 <= images.min() and images.max() <= 1
    assert all(digit_of(caption) == label for caption, label in zip(captions, labels.tolist()))


def test_digit_words_parse_and_a_prompt_without_one_is_an_error():
    assert [digit_of(f"a thick handwritten digit {word}") for word in DIGIT_WORDS] == list(range(10))
    with pytest.raises(ValueError, match="names no digit word"):
        digit_of("a cat")


def test_frechet_distance_is_zero_for_a_set_against_itself_and_large_for_noise():
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()  # untrained features still separate digits from noise
    images = real_digits("eval")[0][:200]
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(1))
    assert abs(frechet_distance(images, images, classifier)) < 1e-6
    assert frechet_distance(noise, images, classifier) > 10 * frechet_distance(images[:100], images[100:], classifier)
    assert 0 <= digit_accuracy(images[:10], ["a handwritten digit one"] * 10, classifier) <= 1
