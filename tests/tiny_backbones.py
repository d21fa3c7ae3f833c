"""Tiny test backbones, registered into `xcent.extract.backbones.ARCHS` by the tests
that use them (they are not user-facing ``--arch`` choices).

- ``iresnet_tiny``: the library's IResNet, one narrow unit per stage, on 112x112 faces.
- ``clip_tiny``: a two-conv image tower with CLIP-style preprocessing (resize the short
  side, center crop, OpenAI CLIP mean/std) and L2-normalized output, standing in for
  ``bioclip`` where open_clip cannot be imported.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xcent.extract import backbones

# OpenAI CLIP's normalization, which open_clip uses for ViT-B-16 and hence BioCLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def iresnet_tiny(feature_dim: int = 16) -> backbones.IResNet:
    return backbones.IResNet((1, 1, 1, 1), widths=(4, 8, 8, 8), feature_dim=feature_dim)


class TinyImageTower(nn.Module):
    def __init__(self, feature_dim: int = 16, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.proj = nn.Linear(2 * width, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.proj(x.mean(dim=(2, 3)))


class ClipPreprocess:
    """Resize the short side to ``size`` (bicubic), center crop, CLIP mean/std."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(new_size, Image.BICUBIC)
        left, top = (new_size[0] - self.size) // 2, (new_size[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        array = (np.asarray(image, dtype=np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _build_iresnet_tiny(arch, pretrained_path, feature_dim):
    model = iresnet_tiny(feature_dim)
    backbones.load_weights(model, pretrained_path, arch)
    return backbones.Backbone(arch, model, backbones.FacePreprocess(model.input_size), feature_dim, normalize=False)


def _build_clip_tiny(arch, pretrained_path, feature_dim):
    model = TinyImageTower(feature_dim)
    backbones.load_weights(model, pretrained_path, arch)
    return backbones.Backbone(arch, model, ClipPreprocess(32), feature_dim, normalize=True)


TINY = {"iresnet_tiny": _build_iresnet_tiny, "clip_tiny": _build_clip_tiny}


def register() -> None:
    for name, builder in TINY.items():
        backbones.register_arch(name, builder)


def unregister() -> None:
    for name in TINY:
        backbones.ARCHS.pop(name, None)
