"""Image backbones for feature extraction, chosen by name (``--arch``).

- ``iresnet18/34/50/100/200``: the insightface IResNet face-recognition networks,
  written here from the published description (Deng et al., "ArcFace", CVPR 2019,
  section 3.2 and the "improved residual unit" of Han et al. / fig. "IR" block):
  a 3x3 stem (conv-BN-PReLU) on the 112x112 aligned face; four stages of
  pre-activation units ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride s) -> BN`` plus a
  shortcut (1x1 conv + BN when the shape changes), each stage halving the resolution
  (112 -> 56 -> 28 -> 14 -> 7); then the "E" embedding head
  ``BN -> dropout -> FC(512*7*7 -> 512) -> BN``. Stage depths: r50 = (3, 4, 14, 3).
  Module names follow the released checkpoints (``conv1``, ``bn1``, ``prelu``,
  ``layer1``..``layer4``, ``bn2``, ``fc``, ``features``) so ``--pretrained-path`` can load
  a published ``backbone.pth`` state_dict as is.
- ``bioclip``: BioCLIP's ViT-B-16 image tower through ``open_clip`` (imported only here,
  so the rest of xcent never needs it), with open_clip's own preprocessing.

Face features (iresnet) are returned as the network gives them; CLIP features are
L2-normalized, as BioCLIP's ``encode_image(normalize=True)`` does.

`ARCHS` is the user-facing registry (the ``--arch`` choices). `register_arch` adds a
backbone to it (tests register tiny networks this way; so can a user with a backbone
of their own, before calling the extraction).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError


# --------------------------------------------------------------------------- IResNet
def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """The improved residual unit: BN-conv-BN-PReLU-conv-BN, stride on the second conv."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet with the BN-dropout-FC-BN embedding head.

    Args:
        depths: units per stage, e.g. (3, 4, 14, 3) for iresnet50.
        widths: channels per stage; the published networks use (64, 128, 256, 512).
        feature_dim: embedding size (512 in the published networks).
        input_size: side of the square input; the head's FC expects input_size / 16.
        dropout: dropout before the FC (inactive at extraction, kept for the checkpoint).
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        feature_dim: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError("IResNet has four stages")
        stem_width = widths[0]
        self.conv1 = _conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=1e-5)
        self.prelu = nn.PReLU(stem_width)
        in_channels = stem_width
        for i, (depth, width) in enumerate(zip(depths, widths), start=1):
            units = [IBasicBlock(in_channels, width, stride=2)]
            units += [IBasicBlock(width, width) for _ in range(depth - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            in_channels = width
        spatial = input_size // 16
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * spatial * spatial, feature_dim)
        self.features = nn.BatchNorm1d(feature_dim, eps=1e-5)
        # The published head keeps the last BN's scale fixed at 1 (only its shift trains).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self.feature_dim = feature_dim
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


IRESNET_DEPTHS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


def iresnet(name: str, feature_dim: int = 512) -> IResNet:
    """A published IResNet by name (``iresnet50`` ...), randomly initialised."""
    return IResNet(IRESNET_DEPTHS[name], feature_dim=feature_dim)


# ------------------------------------------------------------------- preprocessing
def _to_chw(image, mean, std) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1], then (x - mean) / std per channel."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class FacePreprocess:
    """insightface's recipe: the aligned face as is, to tensor, normalized with mean = std = 0.5.

    Faces must already have the network's input size: an aligned crop of another size is
    not something a resize would repair, so it is rejected (and counted as a bad image).
    """

    def __init__(self, size: int = 112):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} aligned face, got {image.size[0]}x{image.size[1]}")
        return _to_chw(image.convert("RGB"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ------------------------------------------------------------------------ registry
@dataclass
class Backbone:
    """A ready-to-run extractor: ``preprocess`` (PIL image -> tensor) runs in data-loader
    workers, ``encode`` (batch tensor -> features) on the device."""

    name: str
    model: nn.Module
    preprocess: Callable
    feature_dim: int
    normalize: bool

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images)
        return F.normalize(features, dim=-1) if self.normalize else features


def load_state_dict_file(path: str) -> dict:
    """A state_dict from a file: a bare one, or under ``state_dict``/``model``; the
    ``module.`` prefix of DataParallel/DDP checkpoints is removed."""
    if not os.path.isfile(path):
        raise UsageError(f"--pretrained-path: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a usage error
        raise UsageError(f"--pretrained-path: cannot load {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UsageError(f"--pretrained-path: {path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, pretrained_path: str | None, arch: str) -> None:
    """Load a state_dict file into ``model`` (strict), or raise a one-line `UsageError`
    naming ``--pretrained-path`` when it is missing or does not fit."""
    if pretrained_path is None:
        raise UsageError(f"--pretrained-path is required for --arch {arch} (a state_dict file)")
    state = load_state_dict_file(pretrained_path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch, e.g. a different --feature-dim
        raise UsageError(
            f"--pretrained-path: {pretrained_path} does not fit --arch {arch}: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3])
        unexpected = ", ".join(result.unexpected_keys[:3])
        raise UsageError(
            f"--pretrained-path: {pretrained_path} does not fit --arch {arch} "
            f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})"
        )


def _build_iresnet(arch: str, pretrained_path: str | None, feature_dim: int) -> Backbone:
    model = iresnet(arch, feature_dim)
    load_weights(model, pretrained_path, arch)
    return Backbone(arch, model, FacePreprocess(model.input_size), feature_dim, normalize=False)


BIOCLIP_HUB = "hf-hub:imageomics/bioclip"


def import_open_clip(arch: str):
    """``open_clip``, or a one-line `UsageError` that names the fix.

    open_clip imports torchvision, whose wheels only load beside the torch build they
    were made for: the common failure is not a missing package but a mismatched pair.
    """
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError(
            f"--arch {arch} needs open_clip with a torchvision built for torch {torch.__version__}; install "
            f"a matching pair, e.g. pip install torch==2.14.1 torchvision==0.29.1 'xcent[extract]' "
            f"(see docs/data-preparation.md); import failed: {reason}"
        ) from exc
    return open_clip


def open_clip_builder(model_name: str, default_source: str | None = None):
    """A builder for the image tower of the open_clip model ``model_name``, with
    open_clip's own preprocessing, from ``--pretrained-path`` (an open_clip checkpoint
    file or ``hf-hub:NAME``) or ``default_source``."""

    def build(arch: str, pretrained_path: str | None, feature_dim: int) -> Backbone:
        open_clip = import_open_clip(arch)
        source = pretrained_path or default_source
        if source is None:
            raise UsageError(f"--pretrained-path is required for --arch {arch} (an open_clip checkpoint file)")
        try:
            if source.startswith("hf-hub:"):
                model, _, preprocess = open_clip.create_model_and_transforms(source)
            else:
                if not os.path.isfile(source):
                    raise UsageError(f"--pretrained-path: file not found: {source}")
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=source)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint or an unreachable hub
            reason = " ".join(str(exc).split())[:200]
            raise UsageError(
                f"--pretrained-path: cannot load {model_name} for --arch {arch} from {source}: {reason}"
            ) from exc
        output_dim = int(getattr(model.visual, "output_dim", feature_dim))
        return Backbone(arch, _ImageTower(model), preprocess, output_dim, normalize=True)

    return build


class _ImageTower(nn.Module):
    """``encode_image`` of an open_clip model as a module (normalization is applied by
    `Backbone.encode`); the text tower is dropped to free its memory."""

    def __init__(self, clip):
        super().__init__()
        for name in ("transformer", "token_embedding", "ln_final", "text"):
            if hasattr(clip, name):
                setattr(clip, name, None)
        self.clip = clip

    def forward(self, x):
        return self.clip.encode_image(x)


Builder = Callable[[str, "str | None", int], Backbone]

#: --arch name -> builder(arch, pretrained_path, feature_dim) -> Backbone
ARCHS: dict[str, Builder] = {
    **dict.fromkeys(IRESNET_DEPTHS, _build_iresnet),
    "bioclip": open_clip_builder("ViT-B-16", BIOCLIP_HUB),
}


def register_arch(name: str, builder: Builder) -> None:
    """Make ``builder`` available as ``--arch name`` (replacing an entry of that name)."""
    ARCHS[name] = builder


def build_backbone(arch: str, pretrained_path: str | None, feature_dim: int, device: str) -> Backbone:
    """Build ``arch`` with its weights, in eval mode on ``device``.

    Raises `UsageError` if the weights are missing or do not fit, or if the network's
    output size differs from ``feature_dim``.
    """
    if arch not in ARCHS:
        raise UsageError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    backbone = ARCHS[arch](arch, pretrained_path, feature_dim)
    if backbone.feature_dim != feature_dim:
        raise UsageError(
            f"--feature-dim {feature_dim} does not match --arch {arch}, "
            f"whose features have {backbone.feature_dim} dimensions"
        )
    backbone.model.to(device).eval()
    return backbone
