import numpy as np
import pytest
import torch

from hdm._diffusion import GaussianDiffusion, normal_kl, strided_timesteps


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.linear(1000, 1e-4, 0.02)


def full(value, n):
    return torch.full((n,), value, dtype=torch.long)


def test_q_sample_matches_closed_form(diffusion):
    torch.manual_seed(0)
    n, t = 200_000, 300
    z0 = torch.full((n, 1), 1.5)
    samples = diffusion.q_sample(z0, full(t, n), torch.randn(n, 1))
    mean, var = diffusion.q_mean_variance(z0[:1], full(t, 1))
    abar = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[: t + 1])
    assert mean.item() == pytest.approx(np.sqrt(abar) * 1.5, rel=1e-5)
    assert var.item() == pytest.approx(1 - abar, rel=1e-5)
    assert samples.mean().item() == pytest.approx(mean.item(), abs=0.01)
    assert samples.var().item() == pytest.approx(var.item(), rel=0.02)


def test_posterior_is_bayes_rule(diffusion):
    # q(z_{t-1}|z_t,z_0) ∝ N(z_{t-1}; sqrt(abar_{t-1}) z0, 1-abar_{t-1}) N(z_t; sqrt(1-b_t) z_{t-1}, b_t)
    t, z0, zt = 120, torch.tensor([[0.7]]), torch.tensor([[-0.4]])
    b = diffusion.betas[t].double()
    abar_prev = diffusion.alphas_cumprod_prev[t].double()
    prior_mean, prior_var = abar_prev.sqrt() * 0.7, 1 - abar_prev
    lik_prec = (1 - b) / b
    post_var = 1 / (1 / prior_var + lik_prec)
    post_mean = post_var * (prior_mean / prior_var + (1 - b).sqrt() * -0.4 / b)
    mean, logvar = diffusion.q_posterior(z0, zt, full(t, 1))
    assert mean.item() == pytest.approx(post_mean.item(), rel=1e-4)
    assert logvar.exp().item() == pytest.approx(post_var.item(), rel=1e-4)


def test_predict_z0_inverts_q_sample(diffusion):
    z0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    zt = diffusion.q_sample(z0, t, noise)
    assert torch.allclose(diffusion.predict_z0(zt, t, noise), z0, atol=1e-3)
    assert torch.allclose(diffusion.predict_eps(zt, t, z0), noise, atol=1e-3)


def test_learned_variance_interpolates_between_bounds(diffusion):
    t = full(50, 1)
    lo = diffusion.model_log_variance(torch.full((1, 1), -1.0), t)
    hi = diffusion.model_log_variance(torch.full((1, 1), 1.0), t)
    mid = diffusion.model_log_variance(torch.zeros(1, 1), t)
    assert lo.item() == pytest.approx(diffusion.posterior_log_variance[50].item())
    assert hi.item() == pytest.approx(np.log(diffusion.betas[50].item()), rel=1e-5)
    assert mid.item() == pytest.approx((lo.item() + hi.item()) / 2)


def test_vlb_is_nonnegative_and_zero_for_true_posterior(diffusion):
    torch.manual_seed(1)
    z0, noise = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    t = torch.randint(0, 1000, (8,))
    zt = diffusion.q_sample(z0, t, noise)
    wrong = diffusion.vlb_terms(z0, zt, t, torch.randn_like(noise), torch.rand_like(noise) * 2 - 1)
    exact = diffusion.vlb_terms(z0, zt, t, noise, -torch.ones_like(noise))
    assert (wrong >= 0).all() and (wrong > 1e-3).all()
    assert exact.abs().max().item() < 1e-4
    assert normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1)).item() == pytest.approx(0.5)


def test_sampled_variance_grows_with_tau(diffusion):
    torch.manual_seed(2)
    n = 100_000
    zt = torch.zeros(n, 1)
    t = full(400, n)
    eps, v = torch.zeros(n, 1), torch.zeros(n, 1)
    variances = [diffusion.p_sample(eps, v, zt, t, torch.randn(n, 1), tau=tau).var().item() for tau in (0.0, 1.0, 3.0)]
    assert variances[0] < variances[1] < variances[2]
    assert variances[1] / variances[0] == pytest.approx(2.0, rel=0.03)
    assert variances[2] / variances[0] == pytest.approx(4.0, rel=0.03)
    last = diffusion.p_sample(eps[:5], v[:5], zt[:5], full(0, 5), torch.randn(5, 1), tau=3.0)
    assert torch.equal(last, diffusion.p_mean_variance(eps[:5], v[:5], zt[:5], full(0, 5))[0])


def test_respaced_schedule_keeps_cumulative_alphas(diffusion):
    steps = strided_timesteps(400, 4)
    assert steps[0] == 0 and steps[-1] == 400 and len(steps) == 5
    sub = diffusion.respaced(steps)
    assert torch.allclose(sub.alphas_cumprod, diffusion.alphas_cumprod[steps], rtol=1e-5)
    assert sub.timestep_map.tolist() == steps


def test_ddim_step_with_true_noise_stays_on_the_forward_path(diffusion):
    sub = diffusion.respaced(strided_timesteps(300, 3))
    z0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    zt = sub.q_sample(z0, full(3, 2), noise)
    z_prev = sub.ddim_step(noise, zt, full(3, 2))
    assert torch.allclose(z_prev, sub.q_sample(z0, full(2, 2), noise), atol=1e-4)
