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
# the bases of build_bases per size. "real" follows the hub configs of runwayml/stable-diffusion-v1-5 (SIZES' SD1.5
# UNet, not w-conditioned), stabilityai/stable-diffusion-xl-base-1.0 (UNet, CLIP ViT-L and OpenCLIP bigG text encoders,
# VAE) and latent-consistency/lcm-sdxl (the SDXL UNet plus time_cond_proj_dim 256); the text encoders' embedding tables
# have the byte tokenizer's vocabulary, as build_pipeline's. sdxl_unet is the LCM's (the base's has no
# time_cond_proj_dim); sdxl_vae and text_2 None: the SD1.5 base's VAE and the first text encoder's config.
BASE_SIZES = {
    "tiny": dict(
        sd_unet={**SIZES["tiny"]["unet"], "sample_size": 16, "time_cond_proj_dim": None},
        sdxl_unet={**SIZES["tiny"]["unet"], "sample_size": 16, "cross_attention_dim": 2 * TEXT_DIM,
                   "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": TEXT_DIM + 6 * 8},
        vae=dict(sample_size=RESOLUTION, **SIZES["tiny"]["vae"]), sdxl_vae=None,
        text=dict(projection_dim=TEXT_DIM, **SIZES["tiny"]["text"]), text_2=None, lora_rank=4,
    ),
    "real": dict(
        sd_unet={**SIZES["real"]["unet"], "sample_size": 64, "time_cond_proj_dim": None},
        sdxl_unet=dict(layers_per_block=2, block_out_channels=(320, 640, 1280),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                       use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128,
                       time_cond_proj_dim=256),
        vae=dict(sample_size=512, **SIZES["real"]["vae"]),
        sdxl_vae=dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **SIZES["real"]["vae"]),
        text=dict(projection_dim=768, **SIZES["real"]["text"]),  # CLIP ViT-L/14 (quick_gelu, the config's default)
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu"),  # OpenCLIP ViT-bigG/14
        lora_rank=64,
    ),
}
BASE_NAMES = ("sd_base", "sdxl_base", "lcm_sdxl_unet", "lcm_lora_sd", "lcm_lora_sdxl")
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


def build_bases(root: Path, seed: int = 3, size: str = "tiny", names: tuple[str, ...] = BASE_NAMES) -> dict[str, Path]:
    """The few-step bases beside the LCM pipeline (BASE_SIZES[size]): an SD1.5 and an SDXL base pipeline (UNets without
    w-conditioning, their own schedulers: PNDM, EulerDiscrete), an LCM-LoRA for each, and a UNet-only SDXL LCM
    (w-conditioned, as latent-consistency/lcm-sdxl); size "real": their real architectures, random weights (an SDXL
    UNet is 10 GB in fp32). names: build only these (an LCM-LoRA without its base is written for a UNet of the base's
    architecture that is not saved); random weights differ from the full build's then."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root, want, sizes = Path(root), set(names), BASE_SIZES[size]
    torch.manual_seed(seed)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    channels = dict(in_channels=3, out_channels=3, latent_channels=4)
    vae = AutoencoderKL(**channels, **sizes["vae"])
    vocab_size = write_char_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text, text_2 = (CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=1, **config)
                    for config in (sizes["text"], sizes["text_2"] or sizes["text"]))
    sd_unet = UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["sd_unet"]) \
        if want & {"sd_base", "lcm_lora_sd"} else None
    if "sd_base" in want:
        StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=sd_unet,
                                scheduler=PNDMScheduler(**schedule, skip_prk_steps=True, steps_offset=1),
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(root / "sd_base")
    sdxl_unet = dict(in_channels=4, out_channels=4, **sizes["sdxl_unet"])
    sdxl_base_unet = {**sdxl_unet, "time_cond_proj_dim": None}
    if "sdxl_base" in want:
        StableDiffusionXLPipeline(
            vae=AutoencoderKL(**channels, **sizes["sdxl_vae"]) if sizes["sdxl_vae"] else vae,
            text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text_2),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**sdxl_base_unet),
            scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading", steps_offset=1),
            add_watermarker=False).save_pretrained(root / "sdxl_base")
    if "lcm_sdxl_unet" in want:
        UNet2DConditionModel(**sdxl_unet).save_pretrained(root / "lcm_sdxl_unet")
    # random LCM-LoRAs on the real ones' modules, rank 64 at real size as theirs (a fused LoRA costs nothing to time)
    unets = {"sd": lambda: sd_unet, "sdxl": lambda: UNet2DConditionModel.from_pretrained(root / "sdxl_base/unet")
             if "sdxl_base" in want else UNet2DConditionModel(**sdxl_base_unet)}
    for name, unet in unets.items():
        if f"lcm_lora_{name}" in want:
            write_lora(unet(), root / f"lcm_lora_{name}", scale=0.1, rank=sizes["lora_rank"])
    return {name: root / name for name in BASE_NAMES if name in want}


# the modules that diffusers' LCM-LoRA distillation scripts target; their LoraConfig kept peft's default alpha, 8
LCM_LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LCM_LORA_ALPHA = 8


def write_lora(unet, directory: Path, scale: float, rank: int = 4) -> None:
    """A random LoRA (B nonzero, so that it changes the UNet) in the hub LCM-LoRAs' format: one
    pytorch_lora_weights.safetensors of kohya-style keys, lora_unet_<module path, dots as _>.lora_down.weight,
    .lora_up.weight and .alpha, which diffusers converts on load. The UNet is left as it was."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=LCM_LORA_ALPHA, target_modules=LCM_LORA_MODULES))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    kohya = {}
    for key, value in get_peft_model_state_dict(unet).items():  # "<module path>.lora_A.weight"
        module, _, matrix = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if matrix.startswith('A') else 'up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(LCM_LORA_ALPHA))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(kohya, directory / "pytorch_lora_weights.safetensors")
    unet.unload_lora()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["tiny"], ["real"]):
        raise SystemExit("usage: python -m tests.tiny_world OUT_DIR [tiny|real]")
    for name, path in build_tiny_world(Path(sys.argv[1]), *sys.argv[2:]).items():
        print(f"{name}: {path}")
