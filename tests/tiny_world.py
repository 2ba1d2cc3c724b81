"""Build a tiny, randomly initialised LCM pipeline and tiny reward models, saved in the real formats.

Every script loads these through its normal from_pretrained path, so tests exercise the real
loading code offline. Usage: python -m tests.tiny_world OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 4 x 16 x 16
TEXT_DIM = 32
PROMPTS = ("a red apple on a table", "a blue bird in the sky", "a green field at dawn", "a cat")


def write_char_tokenizer(directory: Path, max_length: int = 77) -> None:
    """A CLIPTokenizer whose BPE has no merges: every word splits into characters.

    The vocabulary covers CLIP's byte-to-unicode alphabet, each symbol also with the end-of-word
    marker, so any text tokenizes without unknown tokens.
    """
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    for symbol in symbols:
        vocab.setdefault(symbol + "</w>", len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(directory)


def byte_symbols() -> list[str]:
    """The GPT-2/CLIP byte-level alphabet: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    return [chr(c) for c in printable] + [chr(c) for c in shifted]


def vocab_size() -> int:
    return 2 + 2 * len(byte_symbols())


def build_pipeline(directory: Path, seed: int = 0) -> Path:
    """A LatentConsistencyModelPipeline directory: tiny UNet (with time_cond_proj_dim), VAE, CLIP text."""
    from diffusers import AutoencoderKL, LCMScheduler, LatentConsistencyModelPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=8, norm_num_groups=16, time_cond_proj_dim=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=RESOLUTION,
    )
    write_char_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True,
                             clip_sample=False, prediction_type="epsilon")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def build_clip_reward(directory: Path, seed: int = 1, aesthetic_head: bool = False) -> Path:
    """A tiny transformers CLIPModel (+ tokenizer, + optionally the LAION aesthetic head file).

    The image projection's sign is chosen so the test prompts score a positive cosine on a mid-grey
    image: CLIPScore's max(cos, 0) then has a nonzero gradient, as it does for real CLIP.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import AESTHETIC_HEAD_FILE, aesthetic_mlp, load_reward

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(config)
    write_char_tokenizer(directory)
    model.save_pretrained(directory)
    if aesthetic_head:
        head = aesthetic_mlp(config.projection_dim)
        torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, directory / AESTHETIC_HEAD_FILE)

    reward = load_reward("clipscore", str(directory))
    grey = torch.full((len(PROMPTS), 3, RESOLUTION, RESOLUTION), 0.5)
    with torch.no_grad():
        cosine = (reward.image_embeds(grey) * reward.text_embeds(PROMPTS)).sum(-1)
    if cosine.mean() < 0:
        with torch.no_grad():
            model.visual_projection.weight.neg_()
        model.save_pretrained(directory)
    CLIPTokenizer.from_pretrained(directory)  # fail here, not in a test, if the tokenizer is unreadable
    return directory


def build_tiny_world(root: Path) -> dict[str, Path]:
    """Everything the scripts need, under root: lcm/, clip/ (pickscore, hpsv2, clipscore), aesthetic/."""
    root = Path(root)
    paths = {"lcm": build_pipeline(root / "lcm"), "clip": build_clip_reward(root / "clip"),
             "aesthetic": build_clip_reward(root / "aesthetic", seed=2, aesthetic_head=True)}
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    paths["prompts"] = prompts
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.tiny_world OUT_DIR")
    for name, path in build_tiny_world(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
