"""Does torch.compile (inductor) give the right input gradient through a diffusers-style upsampling block?

Why bench_step.py --fast refuses inductor on the CPU. On torch 2.13's CPU backend, inductor returns an all-zero
input gradient for conv -> GroupNorm -> conv -> /1.0 -> nearest upsample -> conv with frozen
weights: the pattern of the UNet's first up block (ResnetBlock2D ends with /output_scale_factor,
then Upsample2D), which sits inside a UNet whose base weights are frozen. In the backward pass the
upsample's gradient is a scatter (index_put, accumulate) into a zero buffer; when the CPU backend
fuses the following division with its copy to channels_last it recomputes the node's loop body and
drops the buffer's mutation rename (SchedulerNode.recompute_size_and_body), so the division reads
the zero buffer before the scatter has run. Upstream: pytorch PR #185873 ("Preserve mutation renames
after scheduler recompute"). With trainable weights, or with layout_optimization off, it is right.
In rocm_kl's step all LoRA gradients below that block came out wrong (up to 100%).

Prints the largest gap of the compiled input gradient to eager's, relative to eager's largest entry,
for frozen and trainable weights; exits non-zero if a gap exceeds 1e-4. Run it after a torch upgrade
(and once on a GPU) to see whether the refusal can go:
    python benchmarks/inductor_gradient_check.py                  # CPU
    python benchmarks/inductor_gradient_check.py --device cuda
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # a cached kernel would hide a fix or a bug

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

TOLERANCE = 1e-4


@dataclass
class Args:
    device: str = "cpu"
    """torch device to compile for"""
    layout_optimization: bool = True
    """inductor's layout_optimization (its default); off is the known CPU workaround"""


class UpsamplingBlock(nn.Module):
    """The end of diffusers' ResnetBlock2D (conv, GroupNorm, conv, / output_scale_factor) and Upsample2D."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.conv_in, self.conv_mid, self.conv_out = (nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))
        self.norm = nn.GroupNorm(16, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_mid(self.norm(self.conv_in(x))) / 1.0
        return self.conv_out(F.interpolate(h, scale_factor=2.0, mode="nearest"))


def input_gradient_gap(block: nn.Module, device: torch.device) -> float:
    torch._dynamo.reset()
    x = torch.randn(1, 64, 8, 8, device=device, requires_grad=True)
    grad_out = torch.randn(1, 64, 16, 16, device=device)
    (eager,) = torch.autograd.grad(block(x), x, grad_out)
    (compiled,) = torch.autograd.grad(torch.compile(block, backend="inductor")(x), x, grad_out)
    return ((compiled - eager).abs().max() / eager.abs().max()).item()


def main(args: Args) -> None:
    torch._inductor.config.layout_optimization = args.layout_optimization
    torch.manual_seed(0)
    device = torch.device(args.device)
    block = UpsamplingBlock().to(device)
    gaps = {}
    for weights in ("frozen", "trainable"):
        block.requires_grad_(weights == "trainable")
        gaps[weights] = input_gradient_gap(block, device)
        print(f"torch {torch.__version__}, {device}, {weights} weights: compiled input gradient off by "
              f"{gaps[weights]:.1e} of its largest entry")
    if max(gaps.values()) > TOLERANCE:
        raise SystemExit(f"error: inductor's input gradient is wrong here (gap above {TOLERANCE:g}); do not compile "
                         "the UNet with inductor on this device")
    print("inductor's input gradient matches eager")


if __name__ == "__main__":
    main(tyro.cli(Args))
