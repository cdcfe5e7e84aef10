import warnings

import pytest
import torch
import torch.nn.functional as F

from hdm._config import POMConfig
from hdm._space import lift_matrix
from hdm._pom import (NormalDensity, adapt_tau, cell_targets, coreset, filter_samples, focal_loss, map_losses,
                     masked_change, refinement_losses, top_k_mean)


def test_masked_change_measures_only_inside_the_mask():
    z0 = torch.zeros(2, 4, 8, 8)
    z = z0.clone()
    z[:, :, :4] = 2.0  # change of 4 per channel in the top half
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :2] = 1  # inside the changed half
    mask[1, :, 6:] = 1  # outside it
    assert masked_change(z, z0, mask).tolist() == [4.0, 0.0]
    assert masked_change(z, z0, torch.zeros(2, 1, 8, 8)).tolist() == [0.0, 0.0]


def test_filter_drops_too_small_and_too_large_changes():
    keep, small, large = filter_samples(torch.tensor([0.01, 0.5, 3.0, 50.0]), 0.25, 6.0)
    assert keep.tolist() == [False, True, True, False]
    assert small.tolist() == [True, False, False, False]
    assert large.tolist() == [False, False, False, True]


def test_tau_rises_when_samples_are_too_tame_and_falls_when_they_explode():
    config = POMConfig(tau_rate=0.1, tau_max=5.0)
    assert adapt_tau(1.0, too_small=4, too_large=0, count=4, config=config) > 1.0
    assert adapt_tau(1.0, too_small=0, too_large=4, count=4, config=config) < 1.0
    assert adapt_tau(1.0, 2, 2, 4, config) == 1.0
    assert adapt_tau(5.0, 4, 0, 4, config) == 5.0  # clipped at tau_max
    assert adapt_tau(1.0, 4, 0, 4, POMConfig(adapt_tau=False)) == 1.0


def test_focal_loss_down_weights_easy_cells():
    target = torch.tensor([1.0, 0.0])
    easy, hard = torch.tensor([6.0, -6.0]), torch.tensor([-1.0, 1.0])
    assert focal_loss(easy, target, 2.0, 0.5) < 1e-4
    assert focal_loss(hard, target, 2.0, 0.5) > 100 * focal_loss(easy, target, 2.0, 0.5)
    # gamma = 0, alpha = 0.5 is half the binary cross-entropy
    assert focal_loss(hard, target, 0.0, 0.5).item() == pytest.approx(
        0.5 * F.binary_cross_entropy_with_logits(hard, target).item())


def test_top_k_mean():
    values = torch.arange(100.0).view(1, 1, 10, 10)
    assert top_k_mean(values, 0.0).item() == 99.0
    assert top_k_mean(values, 0.05).item() == pytest.approx(97.0)


def test_partly_covered_cells_become_full_targets_from_the_coverage_threshold():
    coverage = torch.tensor([0.0, 0.05, 0.125, 0.25, 0.6, 1.0])
    assert cell_targets(coverage, 0.25).tolist() == pytest.approx([0.0, 0.2, 0.5, 1.0, 1.0, 1.0])
    assert torch.equal(cell_targets(coverage, 1.0), coverage)  # 1.0: the covered fraction itself


def test_map_losses_reward_a_full_answer_on_a_quarter_covered_cell():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, 1] = 0.25
    label = torch.ones(1)
    confident = torch.full((1, 1, 4, 4), -6.0)
    confident[..., 1, 1] = 6.0
    timid = confident.clone()
    timid[..., 1, 1] = float(torch.logit(torch.tensor(0.25)))
    loss = lambda logits, config: sum(map_losses(logits, mask, label, config, 0.0).values()).item()  # noqa: E731
    sharp, fractional = POMConfig(full_cell_coverage=0.25, lambda_image=0.0), POMConfig(full_cell_coverage=1.0, lambda_image=0.0)
    assert loss(confident, sharp) < loss(timid, sharp)
    assert loss(timid, fractional) < loss(confident, fractional)


def test_refinement_losses_weight_each_sample():
    config = POMConfig()
    logits, mask = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    residual = torch.zeros_like(logits)  # the refined logits are then `logits` itself
    ones = refinement_losses(logits, residual, mask, torch.ones(2), config)
    target = cell_targets(mask, config.full_cell_coverage)
    # unit weights: the plain mean losses
    assert ones["refine_focal"].item() == pytest.approx(focal_loss(logits, target, config.focal_gamma, config.focal_alpha).item())
    assert ones["refine_l1"].item() == pytest.approx(F.smooth_l1_loss(torch.sigmoid(logits), target).item())
    # a sample of weight 0 adds nothing: only the first sample's loss, halved by the batch mean
    first = refinement_losses(logits, residual, mask, torch.tensor([1.0, 0.0]), config)
    alone = refinement_losses(logits[:1], residual[:1], mask[:1], torch.ones(1), config)
    for key in ("refine_focal", "refine_l1"):
        assert first[key].item() == pytest.approx(alone[key].item() / 2)


def test_refinement_raise_penalty_only_where_the_residual_lifts_a_normal_cell():
    config = POMConfig(lambda_refine_raise=1.0)
    up = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # top row defective, bottom row normal
    penalty = lambda residual: refinement_losses(up, residual, mask, torch.ones(1), config)["refine_raise"].item()  # noqa: E731
    assert penalty(torch.tensor([[[[3.0, 3.0], [-3.0, -3.0]]]])) == 0.0  # raising defects, lowering normal cells
    assert penalty(torch.tensor([[[[0.0, 0.0], [2.0, 0.0]]]])) == pytest.approx(4.0 / 4)  # one normal cell lifted by 2
    assert refinement_losses(up, torch.ones(1, 1, 2, 2), mask, torch.ones(1), POMConfig(lambda_refine_raise=0.0))["refine_raise"].item() == 0.0


def test_refinement_losses_see_the_refined_logits_whatever_their_split():
    config = POMConfig()
    up, residual, mask = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    split = refinement_losses(up, residual, mask, torch.ones(2), config)
    whole = refinement_losses(up + residual, torch.zeros_like(up), mask, torch.ones(2), config)
    for key in ("refine_focal", "refine_l1"):
        assert split[key].item() == pytest.approx(whole[key].item())


def test_coreset_keeps_the_rare_patterns_a_uniform_sample_misses():
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(2000, 8, generator=generator) * 0.1
    rare = torch.full((3, 8), 5.0) + torch.arange(3.0)[:, None]  # three far-apart outliers
    cells = torch.cat([common, rare])
    chosen = coreset(cells, 12, generator)
    assert len(set(chosen.tolist())) == 12
    assert {2000, 2001, 2002} <= set(chosen.tolist())


def test_density_distance_is_the_nearest_bank_cell():
    generator = torch.Generator().manual_seed(0)
    density = NormalDensity(channels=5, size=64, chunks=3)
    density.fit(torch.randn(4, 5, 6, 6, generator=generator), generator)
    z = torch.randn(2, 5, 3, 3, generator=generator)
    cells = z.permute(0, 2, 3, 1).reshape(-1, 5)
    expected = torch.cdist(cells, density.bank).amin(1)
    assert torch.allclose(density.distance(z)[:, 0], expected.view(2, 3, 3), atol=1e-4)


def test_prior_measures_distances_in_radii_of_the_bank_cells():
    generator = torch.Generator().manual_seed(0)
    # a tight cluster and a loose one: the same distance is unusual beside the first, ordinary beside the second
    tight, loose = torch.randn(75, 4, generator=generator) * 0.1, torch.randn(75, 4, generator=generator) + 10.0
    normal = torch.cat([tight, loose]).T.reshape(1, 4, 10, 15)
    density = NormalDensity(channels=4, size=150, neighbours=5, power=1.0)  # the bank holds every cell
    density.fit(normal, generator)
    others = torch.cdist(density.bank, density.bank).topk(6, largest=False).values[:, 1:]
    assert torch.allclose(density.radius, others.mean(1), atol=1e-4)
    z = torch.stack([tight[0] + 0.5, loose[0] + 0.5, tight[1] + 0.5, loose[1] + 0.5]).T.reshape(1, 4, 2, 2)
    cells = z.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = (torch.cdist(cells, density.bank) / density.radius).amin(1).log().view(1, 1, 2, 2)
    prior = density(z, 2)
    assert torch.allclose(prior, expected, atol=1e-5)
    assert (prior[0, 0, :, 0] > prior[0, 0, :, 1]).all()
    # the least in radii, not the nearest cell's distance in its radius: a cell between the
    # clusters is nearer the tight one but fewer radii from the loose one
    between = (tight.mean(0) * 0.6 + loose.mean(0) * 0.4)[None, :, None, None]
    to_bank = torch.cdist(between[:, :, 0, 0], density.bank)[0]
    nearest = to_bank.argmin()
    assert density.radius[nearest] < 1.0 < density.radius[to_bank.argmax()]  # the nearest is a tight cell
    assert density(between, 1).exp() < 0.5 * to_bank[nearest] / density.radius[nearest]
    raw = NormalDensity(channels=4, size=150)
    raw.load_state_dict(density.state_dict(), strict=False)
    assert torch.allclose(raw(z, 2), density.distance(z).log(), atol=1e-5)
    assert torch.allclose(density.distance(z), torch.cdist(cells, density.bank).amin(1).view(1, 1, 2, 2), atol=1e-5)
    # a bank drawn with repeats: a repeated cell is not its own neighbour
    repeated = NormalDensity(channels=4, size=600, neighbours=5)
    repeated.fit(normal, generator)
    distinct = repeated.bank.unique(dim=0)
    assert len(distinct) < 150
    radius = torch.cdist(distinct, distinct).topk(6, largest=False).values[:, 1:].mean(1)
    expected = dict(zip(map(tuple, distinct.tolist()), radius.tolist()))
    assert torch.allclose(repeated.radius, torch.tensor([expected[tuple(c)] for c in repeated.bank.tolist()]), atol=1e-4)


def test_each_voice_is_measured_on_held_out_normal_images():
    generator = torch.Generator().manual_seed(0)
    density = NormalDensity(channels=6, size=256)
    density.fit(torch.randn(40, 6, 8, 8, generator=generator), generator)
    held_out = density(torch.randn(10, 6, 8, 8, generator=generator), 8)
    head = torch.randn(10, 1, 8, 8, generator=generator) - 5.0
    density.fit_null(head, held_out)
    assert torch.isclose(density.head_loc, head.median()) and density.head_top > density.head_loc
    assert torch.isclose(density.prior_top, held_out.flatten(1).amax(1).mean())
    far = density(torch.randn(10, 6, 8, 8, generator=generator) + 8.0, 8)
    # far from every normal cell: the fused map says so even where the head stays at its normal level
    fused = density.fuse(torch.full_like(far, -5.0), far)
    assert fused.min() > density.head_top


def test_fusion_lets_the_more_unusual_voice_speak_in_the_head_units():
    density = NormalDensity(channels=1, size=4)
    density.fit_null(torch.tensor([-6.0, -5.0, -5.0, -5.0, -4.0]).view(1, 1, 1, 5),  # head: median -5, maximum -4
                     torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 5))  # prior: median 0.5, maximum 2
    assert float(density.head_top) == -4.0 and float(density.prior_top) == 2.0
    head = torch.tensor([-5.0, 2.0, -5.0]).view(1, 1, 1, 3)
    prior = torch.tensor([3.5, 0.5, 0.5]).view(1, 1, 1, 3)  # 2 units, 0 units, 0 units above the normal median
    fused = density.fuse(head, prior)
    assert torch.allclose(fused, torch.tensor([-5.0 + 2 * 1.0, 2.0, -5.0]).view(1, 1, 1, 3))


def test_pooled_prior_asks_the_bank_about_block_means():
    generator = torch.Generator().manual_seed(0)
    density = NormalDensity(channels=4, size=32, pool=2)
    density.fit(torch.randn(8, 4, 8, 8, generator=generator) * 0.1, generator)
    z = torch.randn(1, 4, 8, 8, generator=generator) * 0.1
    z[:, :, 2:4, 4:6] += 6.0  # one 2x2 block of cells, unlike every normal cell
    unpooled = NormalDensity(channels=4, size=32)
    unpooled.load_state_dict(density.state_dict())
    assert torch.allclose(density(z, 4).exp(), unpooled.distance(F.avg_pool2d(z, 2)), atol=1e-4)
    prior = density(z, 4)[0, 0]
    assert prior.argmax() == 1 * 4 + 2 and (prior > prior[1, 2] - 1.0).sum() == 1


def test_density_through_the_lift_is_the_same_search():
    """z whose last channels are lifted from a coarser grid, as the space makes them: taking those
    channels' dot products on the coarse grid finds the same distances, at every chunking."""
    generator = torch.Generator().manual_seed(0)
    lift = lift_matrix(4, 8, 3)
    coarse = torch.randn(3, 5, 4, 4, generator=generator)
    z = torch.cat([torch.randn(3, 2, 8, 8, generator=generator), lift @ coarse @ lift.T], dim=1)
    plain = NormalDensity(channels=7, size=40, chunks=3, neighbours=4)
    plain.fit(z[:2], generator)
    lifted = NormalDensity(channels=7, size=40, chunks=3, lift=lift, lifted=5, neighbours=4)
    lifted.load_state_dict(plain.state_dict())
    assert lifted.lifted == 5
    for scaled in (False, True):
        assert torch.allclose(lifted.distance(z[2:], scaled), plain.distance(z[2:], scaled), atol=1e-4)
    # pooled queries lie on the coarse grid already: the plain search is kept
    assert NormalDensity(channels=7, size=40, pool=2, lift=lift, lifted=5).lifted == 0


def _clustered_cells(generator: torch.Generator, n: int = 600, channels: int = 6) -> torch.Tensor:
    centres = torch.randn(12, channels, generator=generator) * 4
    return centres[torch.randint(12, (n,), generator=generator)] + torch.randn(n, channels, generator=generator) * 0.5


def test_inverted_file_finds_the_nearest_when_every_list_is_probed_and_a_near_one_otherwise():
    generator = torch.Generator().manual_seed(0)
    normal = _clustered_cells(generator).T.reshape(1, 6, 20, 30)
    exact = NormalDensity(channels=6, size=200, chunks=3)
    exact.fit(normal, torch.Generator().manual_seed(1))
    inverted = NormalDensity(channels=6, size=200, lists=8, probe=8)
    inverted.fit(normal, torch.Generator().manual_seed(1))
    # the same cells, kept sorted by list
    assert torch.equal(inverted.bank.sort(0).values, exact.bank.sort(0).values) and inverted.list_ends[-1] == 200
    z = _clustered_cells(generator, 120).T.reshape(2, 6, 6, 10)
    truth = exact.distance(z)
    assert torch.allclose(inverted.distance(z), truth, atol=1e-4)
    inverted.probe = 1
    probed = inverted.distance(z)
    assert (probed >= truth - 1e-4).all() and (probed - truth).abs().lt(1e-4).float().mean() > 0.8
    # a traced graph (what ONNX export records) searches the whole bank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's own deprecation notice
        traced = torch.jit.trace(lambda x: inverted.distance(x), (z,), check_trace=False)
    assert torch.allclose(traced(z), truth, atol=1e-4)


def test_every_search_measures_in_radii_alike():
    generator = torch.Generator().manual_seed(0)
    normal = _clustered_cells(generator).T.reshape(1, 6, 20, 30)
    exact = NormalDensity(channels=6, size=200, chunks=3, neighbours=8, power=0.5)
    exact.fit(normal, torch.Generator().manual_seed(1))
    inverted = NormalDensity(channels=6, size=200, lists=8, probe=8, neighbours=8, power=0.5)
    inverted.fit(normal, torch.Generator().manual_seed(1))
    z = _clustered_cells(generator, 120).T.reshape(2, 6, 6, 10)
    cells = z.permute(0, 2, 3, 1).reshape(-1, 6)
    truth = (torch.cdist(cells, exact.bank) / exact.radius ** 0.5).amin(1).view(2, 1, 6, 10)
    assert torch.allclose(exact.distance(z, scaled=True), truth, atol=1e-4)
    assert torch.allclose(inverted.distance(z, scaled=True), truth, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's own deprecation notice
        traced = torch.jit.trace(lambda x: inverted.distance(x, scaled=True), (z,), check_trace=False)
    assert torch.allclose(traced(z), truth, atol=1e-4)
    inverted.probe = 1
    assert (inverted.distance(z, scaled=True) >= truth - 1e-4).all()


def test_inverted_file_settings_are_capped_by_the_bank():
    density = NormalDensity(channels=3, size=10, lists=128, probe=4)
    assert density.centroids.shape == (10, 3) and density.probe == 4
    assert NormalDensity(channels=3, size=10, lists=0, probe=4).probe == 0
