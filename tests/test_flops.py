"""The FLOP counter behind TFLOP/s and MFU (pipelines/training/flops.py): exact counts for grouped,
depthwise and transposed convolutions, Linear and attention; paper Stage C / B near 3x forward; the peak
table. All on the meta device: no memory, no compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.training import metrics
from pipelines.training.flops import count_flops, forward_flops, peak_tflops_for, peak_tflops_for_name, training_flops
from pipelines.training.specs import STAGES


def conv_count(conv: nn.Module, x_shape: tuple[int, ...], input_requires_grad: bool):
    with torch.device("meta"):
        x = torch.randn(*x_shape, requires_grad=input_requires_grad)
    return count_flops(lambda: conv(x).pow(2).mean())


@pytest.mark.parametrize("groups", [64, 4], ids=["depthwise", "grouped"])
def test_grouped_conv_backward_is_twice_forward(groups):
    with torch.device("meta"):
        conv = nn.Conv2d(64, 64, kernel_size=3, padding=1, groups=groups)
    count = conv_count(conv, (2, 64, 16, 16), input_requires_grad=True)
    # 2 FLOPs per multiply-add: each of the 2*16*16*64 outputs sums 64/groups channels x 3x3 taps.
    assert count.forward == 2 * (2 * 16 * 16 * 64) * (64 // groups) * 9
    assert count.training == 3 * count.forward


@pytest.mark.parametrize("groups", [64, 4, 1], ids=["depthwise", "grouped", "dense"])
def test_first_layer_conv_counts_only_grad_weight(groups):
    with torch.device("meta"):
        conv = nn.Conv2d(64, 64, kernel_size=3, padding=1, groups=groups)
    count = conv_count(conv, (2, 64, 16, 16), input_requires_grad=False)
    assert count.training == 2 * count.forward


def test_grouped_transposed_conv_backward_is_twice_forward():
    with torch.device("meta"):
        conv = nn.ConvTranspose2d(32, 16, kernel_size=4, stride=2, padding=1, groups=4)
    count = conv_count(conv, (2, 32, 8, 8), input_requires_grad=True)
    # A transposed conv scatters each input element through its group's 16/4 output channels x 4x4 taps.
    assert count.forward == 2 * (2 * 8 * 8 * 32) * (16 // 4) * 16
    assert count.training == 3 * count.forward
    assert conv_count(conv, (2, 32, 8, 8), input_requires_grad=False).training == 2 * count.forward


def test_linear_training_is_three_times_forward():
    with torch.device("meta"):
        linear = nn.Linear(256, 128)
        x = torch.randn(8, 256, requires_grad=True)
    count = count_flops(lambda: linear(x).sum())
    assert count.forward == 2 * 8 * 256 * 128
    assert count.training == 3 * count.forward
    assert training_flops(lambda: linear(x).sum()) == 3 * forward_flops(lambda: linear(x))


def test_attention_backward_is_twice_forward_on_meta():
    with torch.device("meta"):
        q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))
    count = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum())
    assert count.forward == 2 * (2 * 2 * 4 * 64 * 64 * 32)  # scores q.k and scores.v
    assert count.training == 3 * count.forward


def test_count_refuses_a_real_device():
    linear = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="meta device"):
        count_flops(lambda: linear(x).sum())


@pytest.mark.parametrize(
    "stage,shapes",
    [
        ("c", {"text_emb": (77, 1024), "semantic": (16, 24, 24)}),
        ("b", {"text_emb": (77, 1024), "semantic": (16, 12, 12), "stage_a": (4, 128, 128)}),
    ],
    ids=["paper-C-24x24", "paper-B-4x128x128"],
)
def test_paper_stage_training_flops_near_three_times_forward(stage, shapes):
    spec = STAGES[stage]
    config = spec.model_config("paper", {})
    per_sample = metrics.training_flops_per_sample(spec, config, shapes)
    with torch.device("meta"):
        model = spec.build_model(config)
        inputs = spec.example_inputs(shapes)
        r = torch.rand(1)
    forward = forward_flops(lambda: spec.forward(model, inputs, r))
    assert forward > 1e11  # a paper-size model, not a tiny one
    # Below 3x only where an input needs no grad (first layers, conditioning): grad_weight alone.
    assert 0.97 * 3 * forward <= per_sample <= 3 * forward


@pytest.mark.parametrize(
    "device_name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA RTX A6000", 154.8),
        ("NVIDIA RTX 6000 Ada Generation", 364.25),
        ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", None),  # a slice's share of the peak is unknown
        ("Some Future Accelerator", None),
    ],
)
def test_peak_tflops_for_name(device_name, peak):
    assert peak_tflops_for_name(device_name) == peak


def test_peak_tflops_for_prefers_configured_and_skips_cpu():
    assert peak_tflops_for(torch.device("cpu"), None) is None
    assert peak_tflops_for(torch.device("cpu"), 123.0) == 123.0
    assert metrics.peak_tflops_for is peak_tflops_for  # the loop imports it from metrics
