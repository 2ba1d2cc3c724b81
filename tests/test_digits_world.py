"""The committed digits world (world/digits): loads offline through the real loaders, and is really trained."""

import pytest
import torch

import rocm_kl
from common import load_reward
from tests.conftest import load_tiny
from world.digits_metrics import WORLD_DIR, digit_accuracy, real_digits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def eval_digits():
    return real_digits("eval")


def test_four_step_samples_show_the_prompted_digit():
    encode, vae, unet, scheduler = load_tiny(rocm_kl, WORLD_DIR / "lcm")
    prompts = (WORLD_DIR / "prompts_eval.txt").read_text().splitlines() * 4  # 40 samples, every digit 4 times
    schedule = rocm_kl.lcm_schedule(scheduler, 4, "cpu")
    latents, noises = rocm_kl.draw_chain_noise((len(prompts), 4, 8, 8), 4, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        embeds = encode(prompts)
        w = rocm_kl.guidance_embedding(8.5, unet.config.time_cond_proj_dim, len(prompts), "cpu")
        images = rocm_kl.decode(vae, rocm_kl.sample_chain(unet, latents, noises, schedule, embeds, w)[0])
    assert images.shape == (40, 3, 32, 32)
    assert digit_accuracy(images, prompts) >= 0.8


def test_the_diffusers_pipeline_loads_the_world():
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(WORLD_DIR / "lcm")
    image = pipe("a handwritten digit three", num_inference_steps=4, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)


def test_the_judge_reads_real_digits(eval_digits):
    images, captions, _ = eval_digits
    assert digit_accuracy(images, captions) >= 0.95


@pytest.mark.parametrize("name", ["clipscore", "pickscore"])
def test_clip_rewards_rank_matching_captions_above_other_digits(name, eval_digits):
    from world.build_digits_world import other_digit

    reward = load_reward(name, str(WORLD_DIR / "clip"))
    images, captions, _ = eval_digits
    with torch.no_grad():
        matching = reward(images, captions)
        mismatched = reward(images, [other_digit(caption) for caption in captions])
    assert (matching > mismatched).float().mean() >= 0.9


def test_aesthetic_reward_scores_stroke_thickness(eval_digits):
    images, captions, _ = eval_digits
    reward = load_reward("aesthetic", str(WORLD_DIR / "aesthetic"))
    with torch.no_grad():
        scores = reward(images, captions)
    ink = (1 - images.mean(1)).flatten(1).mean(1)  # dark ink on light paper
    assert torch.corrcoef(torch.stack([scores, ink]))[0, 1] > 0.5
