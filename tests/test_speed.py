"""The speed levers of benchmarks/bench_step.py --fast (channels_last, regional torch.compile): same loss and LoRA
gradients, a LoRA that saves and loads. They live in the benchmark until a GPU run shows them faster.

The steps are built by benchmarks/bench_step.py from the scripts' own functions (tiny world, CPU, fp32).
"""

import importlib

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.bench_step import Args as BenchArgs
from benchmarks.bench_step import main as bench_main
from benchmarks.bench_step import RocmBench, speed_up

SCRIPTS = ["rocm_kl", "rocm_fdiv", "rlcm_ppo", "cm_dpo"]
# CPU fp32: channels_last convolutions take other kernels, so float rounding differs a little
TOLERANCE = 1e-3


def rocm_kl_step(tiny) -> RocmBench:
    """rocm_kl's training step on the tiny world (K=2, batch 2, checkpointing on, LoRA B perturbed)."""
    args = BenchArgs(scale="tiny", device="cpu", mixed_precision="no", num_inference_steps=2, resolution=32)
    return RocmBench("rocm_kl", args, tiny, 2)


def assert_close(values: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Loss and every LoRA gradient agree, each to TOLERANCE of its largest entry."""
    assert len(values) == len(reference) > 1
    for value, ref in zip(values, reference):
        assert ref.abs().max() > 0
        assert torch.allclose(value, ref, rtol=TOLERANCE, atol=TOLERANCE * ref.abs().max().item())


def saved_lora_keys(directory) -> list[str]:
    return list(load_file(directory / "pytorch_lora_weights.safetensors"))


def test_channels_last_gives_the_default_loss_and_gradients(tiny, one_torch_thread):
    bench = rocm_kl_step(tiny)
    default = bench.parity_values()
    speed_up(bench.unet, bench.vae, channels_last=True, compile=False)
    conv = bench.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_close(bench.parity_values(), default)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_train_the_eager_path_and_fast_refuses_inductor_on_the_cpu(script):
    """No script carries a speed flag (none has shown a speed-up on a GPU yet); bench_step --fast, where the
    levers live, refuses inductor on the CPU, whose gradients through the upsampling blocks are zero."""
    import tyro

    module = importlib.import_module(script)
    for flag in ("--compile", "--channels-last"):
        with pytest.raises(SystemExit):
            tyro.cli(module.Args, args=[flag])
    with pytest.raises(SystemExit, match="^error: --fast with inductor needs a CUDA device"):
        bench_main(BenchArgs(scale="tiny", device="cpu", mixed_precision="no", fast=True))


@pytest.mark.slow
def test_compile_gives_the_eager_loss_and_gradients_and_a_lora_without_orig_mod(tiny, one_torch_thread, tmp_path):
    """Regional compilation of rocm_kl's UNet blocks and VAE decoder, gradient checkpointing on.

    Compiled with the "eager" backend (Dynamo's graph capture and guards, no code generation): inductor
    on this CPU takes minutes for the tiny world's fwd/bwd variants; the flag itself uses inductor.
    """
    from diffusers import LatentConsistencyModelPipeline

    torch._dynamo.reset()
    bench = rocm_kl_step(tiny)
    assert bench.run_args.gradient_checkpointing
    names = [name for name, p in bench.unet.named_parameters() if p.requires_grad]
    eager = bench.parity_values()
    speed_up(bench.unet, bench.vae, channels_last=False, compile=True, backend="eager")
    blocks = [*bench.unet.down_blocks, bench.unet.mid_block, *bench.unet.up_blocks, bench.vae.decoder]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert bench.unet._compiled_call_impl is None  # the blocks, not the whole model
    compiled = bench.parity_values()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(blocks)
    assert_close(compiled, eager)
    bench.step()  # an optimizer step through the compiled blocks
    assert [name for name, p in bench.unet.named_parameters() if p.requires_grad] == names

    bench.module.save_lora(bench.unet, tmp_path / "lora", bench.run_args)
    keys = saved_lora_keys(tmp_path / "lora")
    assert keys and not any("_orig_mod" in key for key in keys)
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny["lcm"])
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="default")
    loaded = {name: p for name, p in pipe.unet.named_parameters() if "lora" in name}
    trained = dict(bench.unet.named_parameters())
    assert loaded.keys() == {name for name in names}
    assert all(torch.equal(loaded[name], trained[name].detach()) for name in names)
    torch._dynamo.reset()
