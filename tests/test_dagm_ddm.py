import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hdm._config import DAGMConfig, DDMConfig
from hdm._dagm import DAGM, Provenance, appearance_anomaly, foreign_textures, grid_mask, is_grayscale, shuffled_patches
from hdm._ddm import DDM, Refinement, blur_matrix, gaussian_kernel, smooth
from hdm._denoiser import Denoiser
from hdm._diffusion import GaussianDiffusion
from hdm._space import Encoded

C, G, M = 6, 8, 16  # z channels, z grid, mask (stride-4) grid


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.linear(1000, 1e-4, 0.02)


class OracleDenoiser(torch.nn.Module):
    """Predicts exactly the noise that maps z_t back to a known z_0 (for testing samplers)."""

    def __init__(self, diffusion, z0):
        super().__init__()
        self.diffusion, self.z0 = diffusion, z0

    def forward(self, zt, t):
        return self.eps(zt, t), torch.zeros_like(zt)

    def eps(self, zt, t):
        return self.diffusion.predict_eps(zt, t, self.z0)


def test_the_noise_alone_is_the_first_half_of_the_denoiser_output():
    denoiser = Denoiser(C, 16, 1)
    torch.nn.init.normal_(denoiser.out.weight)
    zt, t = torch.randn(2, C, 4, 4), torch.tensor([3, 700])
    eps, _ = denoiser(zt, t)
    assert torch.allclose(denoiser.eps(zt, t), eps, atol=1e-5)


def test_about_half_of_each_batch_stays_normal(diffusion):
    dagm = DAGM(DAGMConfig(p_anomaly=0.5), diffusion, G, M)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    z0 = torch.randn(64, C, G, G)
    app_z, app_m = torch.randn(64, C, G, G), (torch.rand(64, 1, M, M) > 0.7).float()
    batch = dagm.make_batch(z0, app_z, app_m, Denoiser(C, 16, 1), 1.0, rng, gen)
    assert 0.3 < batch.label.mean().item() < 0.7
    assert batch.mask.shape == (64, 1, M, M) and batch.z_mask().shape == (64, 1, G, G)
    normal = batch.label == 0
    assert torch.equal(batch.z[normal], z0[normal]) and batch.mask[normal].sum() == 0
    assert set(batch.source[batch.label > 0].tolist()) == {Provenance.DIFFUSION, Provenance.APPEARANCE}
    # diffusion content stays inside its mask; an appearance anomaly keeps its encoded spread
    outside = (batch.z_mask() == 0).expand_as(z0)
    made = batch.from_(Provenance.DIFFUSION).view(-1, 1, 1, 1).expand_as(z0)
    assert torch.equal(batch.z[outside & made], z0[outside & made])
    appearance = batch.from_(Provenance.APPEARANCE)
    assert torch.equal(batch.z[appearance], app_z[appearance])


def test_appearance_anomaly_cut_to_its_mask_without_spread(diffusion):
    dagm = DAGM(DAGMConfig(p_anomaly=1.0, p_diffusion_max=0.0, appearance_spread=False), diffusion, G, M)
    z0 = torch.randn(16, C, G, G)
    app_z, app_m = torch.randn(16, C, G, G), (torch.rand(16, 1, M, M) > 0.7).float()
    batch = dagm.make_batch(z0, app_z, app_m, Denoiser(C, 16, 1), 1.0, np.random.default_rng(0),
                            torch.Generator().manual_seed(0))
    inside = (torch.nn.functional.max_pool2d(app_m, M // G) > 0).expand_as(z0)
    assert torch.equal(batch.z[inside], app_z[inside]) and torch.equal(batch.z[~inside], z0[~inside])


def test_diffusion_share_ramps_up(diffusion):
    dagm = DAGM(DAGMConfig(p_diffusion_max=0.5, warmup_fraction=0.4), diffusion, G, M)
    assert dagm.diffusion_share(0.0) == 0.0 and dagm.diffusion_share(0.2) == 0.0
    assert 0 < dagm.diffusion_share(0.3) < 0.5 and dagm.diffusion_share(0.9) == 0.5


def test_diffusion_content_spreads_more_with_larger_tau(diffusion):
    z0 = torch.zeros(256, C, G, G)
    spreads = []
    for tau in (0.0, 4.0):
        dagm = DAGM(DAGMConfig(t_a=400, reverse_steps=4), diffusion, G, M)
        dagm.tau = tau
        out = dagm.diffusion_content(z0, OracleDenoiser(diffusion, z0), torch.Generator().manual_seed(0))
        spreads.append(out.var().item())
    assert spreads[1] > spreads[0]


def test_appearance_anomaly_changes_only_the_masked_pixels():
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), 128, np.uint8)
    other = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    textures = [np.full((64, 64, 3), 20, np.uint8)]
    for _ in range(5):
        out, mask = appearance_anomaly(image, other, textures, rng, DAGMConfig())
        assert mask.any()
        assert np.array_equal(out[~mask], image[~mask])
    soft = grid_mask(mask, 8)
    assert soft.shape == (1, 8, 8) and 0 < soft.mean() <= 1


def test_a_grayscale_surface_gets_grayscale_anomalies_of_every_family():
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 255, (3, 64, 64, 1), dtype=np.uint8), 3, axis=3)
    assert is_grayscale(gray) and not is_grayscale(rng.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8))
    textures = foreign_textures(64)
    changed = 0
    for _ in range(24):  # four families, drawn at random
        out, mask = appearance_anomaly(gray[0], gray[1], textures, rng, DAGMConfig(), grayscale=True)
        assert is_grayscale(out[None])
        changed += int(not np.array_equal(out[mask], gray[0][mask]))
    assert changed >= 20


def test_shuffled_patches_keep_the_pixels():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = shuffled_patches(image, np.random.default_rng(1), grid=4)
    assert sorted(out.ravel().tolist()) == sorted(image.ravel().tolist())
    assert not np.array_equal(out, image)


@pytest.mark.parametrize("mode", ["one_step", "norm_guided", "k_step"])
def test_every_denoising_mode_recovers_z0_with_an_oracle(diffusion, mode):
    z0 = torch.randn(2, C, G, G)
    ddm = DDM(DDMConfig(mode=mode, t_s=200, k_steps=3), diffusion, C, 4, 64)
    z0_hat = ddm.denoise(z0, OracleDenoiser(diffusion, z0), torch.randn_like(z0))
    assert torch.allclose(z0_hat, z0, atol=1e-3)


@pytest.mark.parametrize("refine,grid", [(True, M), (False, G)])
def test_head_and_postprocessing_shapes(diffusion, refine, grid):
    ddm = DDM(DDMConfig(refine=refine), diffusion, C, 4, 64).eval()
    encoded = Encoded(torch.randn(3, C, G, G), torch.randn(3, 4, M, M))
    logits = ddm.logits(encoded, Denoiser(C, 16, 1), torch.randn_like(encoded.z))
    assert logits.shape == (3, 1, grid, grid)
    maps, scores = ddm.postprocess(torch.sigmoid(torch.nn.functional.interpolate(logits, size=64)))
    assert maps.shape == (3, 1, 64, 64) and scores.shape == (3,)


def test_refinement_starts_from_the_upsampled_head_logits_and_redraws_edges_from_the_guide():
    refinement = Refinement(guide_channels=4, width=8)
    torch.nn.init.zeros_(refinement.net[-1].weight)
    torch.nn.init.zeros_(refinement.net[-1].bias)
    coarse = torch.randn(2, 1, G, G)
    fine = torch.randn(2, 4, M, M)
    upsampled = torch.nn.functional.interpolate(coarse, size=(M, M), mode="bilinear", align_corners=False)
    assert torch.equal(refinement(coarse, fine), upsampled)  # a residual: nothing learned, nothing changed
    up, residual = refinement.residual(coarse, fine)
    assert torch.equal(up, upsampled) and not residual.any()
    torch.nn.init.normal_(refinement.net[-1].weight)
    changed = fine.clone()
    changed[:, :, 0, 0] += 5.0
    difference = (refinement(coarse, changed) - refinement(coarse, fine)).abs()[:, 0]
    # two 3x3 convolutions: a change in one stride-4 cell reaches only its 5x5 neighbourhood
    assert difference[:, :3, :3].sum() > 0 and difference[:, 3:, :].sum() == 0 and difference[:, :, 3:].sum() == 0


def test_smoothing_keeps_constants_and_mass():
    assert gaussian_kernel(4.0).sum().item() == pytest.approx(1.0)
    flat = torch.full((1, 1, 40, 40), 0.3)
    assert torch.allclose(smooth(flat, blur_matrix(4.0, 40)), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 64, 64)
    spike[0, 0, 32, 32] = 1.0
    blurred = smooth(spike, blur_matrix(4.0, 64))
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4) and blurred.max() < 0.02


def test_smoothing_is_a_separable_blur_with_reflected_borders():
    kernel = gaussian_kernel(2.0)
    pad = kernel.numel() // 2
    maps = torch.rand(2, 1, 24, 24)
    rows = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    expected = F.conv2d(F.pad(rows, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
    assert torch.allclose(smooth(maps, blur_matrix(2.0, 24)), expected, atol=1e-6)
