"""Model FLOPs of one training sample (forward + backward) and the dense bf16 peak of known GPUs: the
numerator and denominator of TFLOP/s and MFU, for the trainer and the bench alike.

FlopCounterMode on the meta device (no memory, no compute) with one formula replaced: torch's
`aten.convolution_backward` ignores `groups` in grad_weight, so a depthwise conv's backward counted
`groups + 1` times its forward (paper Stage C came out 23% over 3x forward). Matmuls keep torch's
formulas; attention on meta runs as bmm (math SDPA backend), so its backward is 2x its forward too,
whereas torch's fused-kernel formulas would add the recomputed scores. Model FLOPs: recomputation is
never counted, so MFU does not reward it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def conv_forward_flops(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int],
                       transposed: bool) -> int:
    """FLOPs (2 per multiply-add) of one convolution, grouped or not, bias ignored.

    Each output position (input position, for a transposed conv) meets every weight of one group
    once: the weight tensor holds (c_out, c_in/groups, *k) (transposed: (c_in, c_out/groups, *k)),
    so prod(w_shape) already divides by the groups."""
    positions = (x_shape if transposed else out_shape)[2:]
    return 2 * x_shape[0] * math.prod(positions) * math.prod(w_shape)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """`aten.convolution_backward`: grad_input and grad_weight each perform the forward's multiply-adds
    once more (every (input, weight, output) triple of the forward appears once in each), so each costs
    the forward; only the gradients in `output_mask` are computed (no grad_input for a first layer)."""
    forward = conv_forward_flops(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


CORRECTED_FORMULAS = {aten.convolution_backward: conv_backward_flops}


def op_kind(op: str) -> str:
    """The kind an aten op's FLOPs are reported under, so a forward op and its backward share a row."""
    name = op.removeprefix("aten.")
    if "convolution" in name or name.startswith("_slow_conv"):
        return "convolution"
    if "attention" in name:
        return "attention"
    if name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm"):
        return "matmul"
    return name


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward and of its backward, per aten op (e.g. {"aten.mm": ...})."""

    forward_by_op: dict[str, int]
    backward_by_op: dict[str, int]

    @property
    def forward(self) -> int:
        return sum(self.forward_by_op.values())

    @property
    def backward(self) -> int:
        return sum(self.backward_by_op.values())

    @property
    def training(self) -> int:
        return self.forward + self.backward

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """(forward, backward) FLOPs per op kind (convolution, matmul, attention), largest first."""
        out: dict[str, list[int]] = {}
        for phase, by_op in enumerate((self.forward_by_op, self.backward_by_op)):
            for op, flops in by_op.items():
                out.setdefault(op_kind(op), [0, 0])[phase] += flops
        return {kind: (fwd, bwd) for kind, (fwd, bwd) in sorted(out.items(), key=lambda kv: -sum(kv[1]))}

    def table(self) -> str:
        """GFLOP per op kind: forward, backward, backward/forward (2.0 = every input and weight has a grad)."""
        lines = [f"{'op kind':<14} {'fwd GFLOP':>12} {'bwd GFLOP':>12} {'bwd/fwd':>8}"]
        for kind, (fwd, bwd) in [*self.by_kind().items(), ("total", (self.forward, self.backward))]:
            ratio = f"{bwd / fwd:8.3f}" if fwd else f"{'-':>8}"
            lines.append(f"{kind:<14} {fwd / 1e9:>12.3f} {bwd / 1e9:>12.3f} {ratio}")
        return "\n".join(lines)


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CORRECTED_FORMULAS)


def _by_op(counter: FlopCounterMode) -> dict[str, int]:
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(forward_and_loss: Callable[[], torch.Tensor], *, backward: bool = True) -> FlopCount:
    """FLOPs of `forward_and_loss()` (a scalar loss of a model and inputs already built on the meta device)
    and, with `backward`, of `loss.backward()`. Build the model outside the call: initialisers are not
    part of a training step."""
    with torch.device("meta"):
        with _counter() as forward_counter:
            loss = forward_and_loss()
        if loss.device.type != "meta":
            raise ValueError(f"count_flops: the loss is on {loss.device}; build the model and its inputs on the "
                             f"meta device (torch.device('meta')), where counting costs no memory and no compute")
        backward_by_op: dict[str, int] = {}
        if backward:
            with _counter() as backward_counter:
                loss.backward()
            backward_by_op = _by_op(backward_counter)
    return FlopCount(_by_op(forward_counter), backward_by_op)


def training_flops(forward_and_loss: Callable[[], torch.Tensor]) -> float:
    """Forward + backward FLOPs of one call of `forward_and_loss` (see `count_flops`)."""
    return float(count_flops(forward_and_loss).training)


def forward_flops(forward: Callable[[], torch.Tensor]) -> float:
    """Forward FLOPs of one call of `forward` (a meta-device computation; any output)."""
    with torch.device("meta"), _counter() as counter:
        forward()
    return float(sum(_by_op(counter).values()))


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (half the "with
# sparsity" figure), matched against torch.cuda.get_device_name() as whole words, most specific first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200 NVL", 835.5),  # 600 W PCIe card: 1,671 sparse
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100 80GB HBM3", 989.4),  # how the SXM5 part names itself
    ("H100 SXM", 989.4),
    ("A100", 312.0),  # SXM4 and PCIe, 40 and 80 GB alike
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("A10G", 70.0),  # the AWS part's own datasheet (140 sparse); the A10's 125 does not apply
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.25),
    ("RTX A6000", 154.8),
)


def peak_tflops_for_name(device_name: str) -> Optional[float]:
    """Dense bf16 peak of the GPU `device_name` names; None when unknown, and for a MIG slice (its share
    of the chip's peak is not in the name)."""
    if re.search(r"\bMIG\b", device_name):
        return None
    for key, value in PEAK_BF16_TFLOPS:
        # Whole words: "A10" must not match "A100", "H200" must not match "GH200".
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            return value
    return None


def peak_tflops_for(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """The peak MFU divides by: `configured` (config `metrics.peak_tflops`) when set, else the table's
    entry for the CUDA device; None on CPUs (no meaningful tensor-core peak: MFU is not reported)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device))
