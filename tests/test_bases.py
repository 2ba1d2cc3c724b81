"""The few-step bases in use today, on tiny models built from configs (tests/tiny_world.py): an SDXL pipeline whose
UNet is replaced by a UNet-only LCM (--unet, as latent-consistency/lcm-sdxl), and SD1.5 and SDXL bases with an
LCM-LoRA fused in (--lcm-lora). The chain is bit-exact with diffusers' own pipelines plus LCMScheduler; every
script trains on each base; the final LoRA, loaded by its model card's code, reproduces the script's samples."""

import importlib
import json
import re

import pytest
import torch

import rocm_kl
from tests.conftest import SHORT_RUN_FLAGS, run_dir_of, tiny_args

PROMPTS = ["a cat", "a red apple on a table"]
# base -> (its flags, as paths in the bases fixture; the pipeline class diffusers resolves it to)
BASES = {
    "sdxl_lcm_unet": ({"model": "sdxl_base", "unet": "lcm_sdxl_unet"}, "StableDiffusionXLPipeline"),
    "sd_lcm_lora": ({"model": "sd_base", "lcm_lora": "lcm_lora_sd"}, "StableDiffusionPipeline"),
    "sdxl_lcm_lora": ({"model": "sdxl_base", "lcm_lora": "lcm_lora_sdxl"}, "StableDiffusionXLPipeline"),
}
# guidance scales: the w-conditioned UNet takes w; the LCM-LoRA bases take one pass at 1, classifier-free above
CHAINS = [("sdxl_lcm_unet", 8.5), ("sd_lcm_lora", 1.0), ("sd_lcm_lora", 2.0), ("sdxl_lcm_lora", 1.0),
          ("sdxl_lcm_lora", 2.0)]


def base_flags(bases, base: str) -> dict[str, str]:
    return {flag: str(bases[name]) for flag, name in BASES[base][0].items()}


def diffusers_pipeline(flags: dict[str, str]):
    """The base as diffusers' users build it (the LCM-SDXL and LCM-LoRA model cards' recipe)."""
    from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel

    components = {"unet": UNet2DConditionModel.from_pretrained(flags["unet"])} if "unet" in flags else {}
    pipe = DiffusionPipeline.from_pretrained(flags["model"], **components)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if "lcm_lora" in flags:
        pipe.load_lora_weights(flags["lcm_lora"], adapter_name="lcm")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def script_samples(unet, encode, scheduler, latent_shape, guidance_scale: float, num_steps: int) -> torch.Tensor:
    """Final latents of the scripts' chain for PROMPTS, with the noise a pipeline draws from seed 3."""
    schedule = rocm_kl.lcm_schedule(scheduler, num_steps, "cpu")
    generator = torch.Generator().manual_seed(3)
    latents, noises = rocm_kl.draw_chain_noise((len(PROMPTS), *latent_shape), num_steps, generator, "cpu")
    w_embedding = rocm_kl.guidance_embedding(guidance_scale, unet.config.time_cond_proj_dim, len(PROMPTS), "cpu")
    with torch.no_grad():
        return rocm_kl.sample_chain(unet, latents, noises, schedule, encode(PROMPTS), w_embedding)[0]


def pipeline_samples(pipe, guidance_scale: float, num_steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return pipe(PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance_scale, height=32, width=32,
                generator=generator, output_type="latent").images


@pytest.mark.parametrize("num_steps", [1, 2, 4])
@pytest.mark.parametrize("base,guidance_scale", CHAINS)
def test_the_chain_is_bit_exact_with_the_diffusers_pipeline(bases, base, guidance_scale, num_steps):
    flags = base_flags(bases, base)
    args = rocm_kl.Args(**flags, resolution=32, guidance_scale=guidance_scale, num_inference_steps=num_steps)
    encode, _, unet, scheduler, latent_shape = rocm_kl.load_lcm(args, torch.device("cpu"), torch.float32)
    pipe = diffusers_pipeline(flags)
    assert type(pipe).__name__ == BASES[base][1]
    ours = script_samples(unet, encode, scheduler, latent_shape, guidance_scale, num_steps)
    assert torch.equal(ours, pipeline_samples(pipe, guidance_scale, num_steps))


@pytest.mark.parametrize("base", ["sd", "sdxl"])
def test_the_hub_format_lcm_lora_is_fused_into_every_layer_it_names_at_its_alpha(bases, base):
    """The tiny LCM-LoRAs are written as the hub's are (kohya-style keys, alpha 8 at rank 4). Each fused weight must be
    the base's plus alpha / rank * up @ down: a loader that skipped keys or alphas could still match a pipeline that
    did the same, so this checks what was fused against the file itself."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    model, lcm_lora = bases[f"{base}_base"], bases[f"lcm_lora_{base}"]
    lora = load_file(lcm_lora / "pytorch_lora_weights.safetensors")
    args = rocm_kl.Args(model=str(model), lcm_lora=str(lcm_lora), resolution=32)
    fused = dict(rocm_kl.load_lcm(args, torch.device("cpu"), torch.float32)[2].named_modules())
    checked = set()
    for name, module in UNet2DConditionModel.from_pretrained(model, subfolder="unet").named_modules():
        key = "lora_unet_" + name.replace(".", "_")
        if f"{key}.alpha" in lora:
            down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
            delta = torch.einsum("or,ri...->oi...", up.flatten(1), down)  # a conv's up is (out, rank, 1, 1)
            expected = module.weight + lora[f"{key}.alpha"] / down.shape[0] * delta
            torch.testing.assert_close(fused[name].weight, expected)
            checked.add(key)
    assert checked == {key.split(".")[0] for key in lora}
    for kind in ("to_q", "to_out_0", "proj_in", "ff_net_2", "conv1", "time_emb_proj", "downsamplers_0_conv"):
        assert any(key.endswith(kind) for key in checked), kind


def test_a_unet_without_guidance_input_gets_one_warning_unless_an_lcm_lora_is_fused(bases, capsys):
    """A base that is not w-conditioned may not be a consistency model; one fused in by an LCM-LoRA, or an
    already fused checkpoint, is: so a warning naming both fixes, not a refusal."""
    for flags, warned in [({"model": str(bases["sd_base"])}, True), (base_flags(bases, "sd_lcm_lora"), False),
                          (base_flags(bases, "sdxl_lcm_unet"), False)]:
        rocm_kl.load_lcm(rocm_kl.Args(**flags, resolution=32), torch.device("cpu"), torch.float32)
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
        assert len(warnings) == warned, (flags, warnings)


def test_under_torchrun_only_rank_0_warns(bases, capsys, monkeypatch):
    flags = {"model": str(bases["sd_base"]), "resolution": 32}
    for rank, warned in [("1", False), ("0", True)]:
        monkeypatch.setenv("RANK", rank)  # as torchrun sets it
        rocm_kl.load_lcm(rocm_kl.Args(**flags), torch.device("cpu"), torch.float32)
        assert ("warning:" in capsys.readouterr().out) == warned, rank


def test_the_warning_names_the_fixes(bases, capsys):
    rocm_kl.load_lcm(rocm_kl.Args(model=str(bases["sdxl_base"]), resolution=32), torch.device("cpu"), torch.float32)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert "may not be a consistency model" in line and "--unet" in line and "--lcm-lora" in line, line


def test_a_missing_lcm_lora_is_one_line(bases, tmp_path):
    args = rocm_kl.Args(model=str(bases["sd_base"]), lcm_lora=str(tmp_path / "no_such_lora"), resolution=32)
    names = f"--model '{args.model}', --lcm-lora '{args.lcm_lora}'"
    with pytest.raises(SystemExit, match=f"^error: could not load {re.escape(names)} \\("):
        rocm_kl.load_lcm(args, torch.device("cpu"), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("script", SHORT_RUN_FLAGS)
@pytest.mark.parametrize("base", BASES)
def test_each_script_trains_on_the_base_and_its_lora_loads_in_diffusers(script, base, bases, tiny, run_script):
    """A step of training (classifier-free guidance with gradients on the LCM-LoRA bases), then the round trip:
    the model card's code, run as written, gives a pipeline that reproduces the script's chain with the trained
    weights (the checkpoint's, loaded as --resume does) bit for bit."""
    flags = base_flags(bases, base)
    guidance_scale = 8.5 if "unet" in flags else 2.0
    # tiny_args' reward last, for rlcm_ppo too: its JPEG sizes of tiny images tie, and ties give PPO no gradient
    command = [*SHORT_RUN_FLAGS[script], *tiny_args(tiny, steps=1), "--eval-rewards", "--save-every", "1",
               "--guidance-scale", str(guidance_scale)]
    for flag, path in flags.items():
        command += [f"--{flag.replace('_', '-')}", path]  # --model last given wins over tiny_args'
    result = run_script(script, *command)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(result.stdout)

    module = importlib.import_module(script.removesuffix(".py"))
    args = module.Args(**flags, resolution=32, guidance_scale=guidance_scale, num_inference_steps=4)
    encode, _, unet, scheduler, latent_shape = module.load_lcm(args, torch.device("cpu"), torch.float32)
    module.add_lora(unet, args.lora_rank, args.lora_alpha)
    trained = torch.load(run_dir / "checkpoints/step_000001/training_state.pt", weights_only=True)["lora"]
    assert not unet.load_state_dict(trained, strict=False).unexpected_keys
    assert any(value.abs().max() > 0 for name, value in trained.items() if "lora_B" in name), "nothing trained"
    ours = script_samples(unet, encode, scheduler, latent_shape, guidance_scale, 4)

    card = (run_dir / "final" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(code, namespace)  # builds the pipeline, loads the LoRA, samples one image
    assert torch.equal(ours, pipeline_samples(namespace["pipe"], guidance_scale, 4))
    assert json.loads((run_dir / "final" / "args.json").read_text())["model"] == flags["model"]


def test_evaluate_scores_a_base_given_by_the_same_flags(bases, tiny, tmp_path):
    from benchmarks import evaluate

    args = evaluate.Args(**base_flags(bases, "sdxl_lcm_unet"), eval_rewards=(f"clipscore={tiny['clip']}",),
                         eval_prompts_file=str(tiny["prompts"]), samples_per_prompt=1, resolution=32,
                         num_inference_steps=2, device="cpu", mixed_precision="no", output=str(tmp_path / "base.json"))
    assert set(evaluate.main(args)) == {"clipscore"}
    assert (tmp_path / "base.png").is_file()
