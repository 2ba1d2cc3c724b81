"""Build a randomly initialised LCM pipeline and reward models, saved in the real formats.

Every script loads these through its normal from_pretrained path, so tests exercise the real
loading code offline. "tiny" (the tests' default) is small enough for a CPU; "real" has the
architectures of LCM_Dreamshaper_v7 (SD1.5 UNet with time_cond_proj_dim 256, SD VAE, CLIP ViT-L
text encoder) and of the reward towers (CLIP ViT-H/14 for PickScore, ViT-L/14 + MLP for the
aesthetic score), for speed and memory benchmarks without downloads.
Usage: python -m tests.tiny_world OUT_DIR [tiny|real]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from world.build_digits_world import write_word_tokenizer  # noqa: E402  (the same byte-level CLIP vocabulary)

RESOLUTION = 32  # pixels; the tiny VAE downsamples by 2, so latents are 4 x 16 x 16
TEXT_DIM = 32

# architecture hyperparameters per size; "real" follows the hub configs of the models named above
SIZES = {
    "tiny": dict(
        unet=dict(layers_per_block=1, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                  attention_head_dim=8, norm_num_groups=16, time_cond_proj_dim=32),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16),
        text=dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        reward_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        reward_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        aesthetic_text=None, aesthetic_vision=None, projection_dim=16, aesthetic_projection_dim=16,
    ),
    "real": dict(
        unet=dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                  attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=256),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        reward_text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         hidden_act="gelu"),  # ViT-H/14 (PickScore, HPSv2)
        reward_vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"),
        aesthetic_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        aesthetic_vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14),  # ViT-L/14 (aesthetic, CLIPScore)
        projection_dim=1024, aesthetic_projection_dim=768,
    ),
}
PROMPTS = ("a red apple on a table", "a blue bird in the sky", "a green field at dawn", "a cat")


def write_char_tokenizer(directory: Path) -> int:
    """A CLIPTokenizer whose BPE has no merges (every word splits into bytes); returns its vocabulary size."""
    return len(write_word_tokenizer(directory, words=[], max_length=77))


def build_pipeline(directory: Path, seed: int = 0, size: str = "tiny") -> Path:
    """A LatentConsistencyModelPipeline directory: UNet (with time_cond_proj_dim), VAE, CLIP text encoder."""
    from diffusers import AutoencoderKL, LCMScheduler, LatentConsistencyModelPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = SIZES[size]
    resolution = RESOLUTION if size == "tiny" else 512
    latent_side = resolution // 2 ** (len(sizes["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=latent_side, in_channels=4, out_channels=4, **sizes["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution, **sizes["vae"])
    vocab_size = write_char_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        **sizes["text"]))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True,
                             clip_sample=False, prediction_type="epsilon")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def build_clip_reward(directory: Path, seed: int = 1, aesthetic_head: bool = False, size: str = "tiny") -> Path:
    """A transformers CLIPModel (+ tokenizer, + optionally the LAION aesthetic head file).

    The image projection's sign is chosen so the test prompts score a positive cosine on a mid-grey
    image: CLIPScore's max(cos, 0) then has a nonzero gradient, as it does for real CLIP.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from common import AESTHETIC_HEAD_FILE, aesthetic_mlp, load_reward

    sizes = SIZES[size]
    prefix = "aesthetic_" if aesthetic_head and sizes["aesthetic_vision"] else ""
    vocab_size = write_char_tokenizer(directory)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **sizes[f"{prefix}text" if prefix else "reward_text"]),
        vision_config=sizes[f"{prefix}vision" if prefix else "reward_vision"],
        projection_dim=sizes[f"{prefix}projection_dim"],
    )
    model = CLIPModel(config)
    model.save_pretrained(directory)
    if aesthetic_head:
        head = aesthetic_mlp(config.projection_dim)
        torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, directory / AESTHETIC_HEAD_FILE)

    if size != "tiny":
        return directory
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


def build_tiny_world(root: Path, size: str = "tiny") -> dict[str, Path]:
    """Everything the scripts need, under root: lcm/, clip/ (pickscore, hpsv2, clipscore), aesthetic/."""
    root = Path(root)
    paths = {"lcm": build_pipeline(root / "lcm", size=size), "clip": build_clip_reward(root / "clip", size=size),
             "aesthetic": build_clip_reward(root / "aesthetic", seed=2, aesthetic_head=True, size=size)}
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    paths["prompts"] = prompts
    return paths


def build_bases(root: Path, seed: int = 3) -> dict[str, Path]:
    """The few-step bases beside the LCM pipeline, tiny: an SD1.5 and an SDXL base pipeline (UNets without
    w-conditioning, their own schedulers: PNDM, EulerDiscrete), an LCM-LoRA for each, and a UNet-only SDXL LCM
    (w-conditioned, as latent-consistency/lcm-sdxl)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    sizes = SIZES["tiny"]
    torch.manual_seed(seed)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, **sizes["vae"])
    vocab_size = write_char_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=TEXT_DIM, **sizes["text"])
    sd_unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                   **{**sizes["unet"], "time_cond_proj_dim": None})
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=sd_unet,
                            scheduler=PNDMScheduler(**schedule, skip_prk_steps=True, steps_offset=1), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "sd_base")
    sdxl_unet = dict(sample_size=16, in_channels=4, out_channels=4, addition_embed_type="text_time",
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
                     **{**sizes["unet"], "cross_attention_dim": 2 * TEXT_DIM})
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**{**sdxl_unet, "time_cond_proj_dim": None}),
        scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading", steps_offset=1),
        add_watermarker=False).save_pretrained(root / "sdxl_base")
    UNet2DConditionModel(**sdxl_unet).save_pretrained(root / "lcm_sdxl_unet")
    for name, unet in (("sd", sd_unet), ("sdxl", UNet2DConditionModel.from_pretrained(root / "sdxl_base/unet"))):
        write_lora(unet, root / f"lcm_lora_{name}", scale=0.1)
    return {name: root / name for name in ("sd_base", "sdxl_base", "lcm_sdxl_unet", "lcm_lora_sd", "lcm_lora_sdxl")}


def write_lora(unet, directory: Path, scale: float, rank: int = 4) -> None:
    """A random LoRA on unet's attention projections (B nonzero, so that it changes the UNet), in the diffusers
    format; the UNet is left as it was."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    unet.unload_lora()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["tiny"], ["real"]):
        raise SystemExit("usage: python -m tests.tiny_world OUT_DIR [tiny|real]")
    for name, path in build_tiny_world(Path(sys.argv[1]), *sys.argv[2:]).items():
        print(f"{name}: {path}")
