"""The auxiliary networks of Stage A's training objective (paper appendix E.1), in pure PyTorch.

* `VGGPerceptual`: an LPIPS-style distance on torchvision's VGG16 ``features`` (first ``blocks`` conv
  blocks), with channel-normalised feature differences as in LPIPS (without LPIPS' learned linear heads).
  Its weights are a local torchvision vgg16 state dict (the caller copies one from an object store).
* `PatchDiscriminator`: the PatchGAN of the VQGAN recipe, trained with a hinge loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from stages.checkpoint import read_state_dict_file

# ReLU outputs closing VGG16's five conv blocks (indices into torchvision vgg16().features).
VGG16_BLOCK_ENDS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptual(nn.Module):
    """Frozen LPIPS-style distance on VGG16 features: sum over blocks of the mean squared difference of
    channel-normalised activations. `weights_path`: a local .safetensors or torch file (None: random
    weights); `source` names it in errors (default: the path)."""

    def __init__(self, blocks: int = 5, weights_path: Optional[str] = None, *, source: Optional[str] = None):
        super().__init__()
        # Imported here: torchvision takes ~1.5 s to import, and the training driver imports this module
        # (through Stage A's runner) without building a perceptual network.
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        last = VGG16_BLOCK_ENDS[blocks - 1]
        self.features = features[: last + 1]
        self.block_ends = VGG16_BLOCK_ENDS[:blocks]
        if weights_path is not None:
            self._load(weights_path, source or weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: str, source: str) -> None:
        state = read_state_dict_file(path)
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or state
        own = self.features.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{source} lacks VGG16 feature weights {missing[:4]} "
                             "(expected a torchvision vgg16 state dict)")
        self.features.load_state_dict({k: state[k] for k in own})

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = torch.cat([reconstruction, target]).float()
        x = (x - self.mean) / self.std
        total = x.new_zeros(())
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.block_ends:
                a, b = x.chunk(2)
                a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total = total + (a - b).pow(2).sum(dim=1).mean()
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.; the VQGAN discriminator of Esser et al.) with GroupNorm instead of
    BatchNorm, so its statistics do not depend on the per-rank micro-batch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out), out),
                       nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)
