"""Flow-matching maths against scipy distributions, hand computations and diffusers' FLUX schedule."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logit

from train import objective
from train.config import ObjectiveConfig

N = 20_000
P_MIN = 1e-3
SEQ = 1024  # image tokens at 512² (only used by the resolution shift)


def draw(cfg: ObjectiveConfig, n: int = N, seed: int = 1234, seq: int = SEQ) -> np.ndarray:
    t = objective.sample_timesteps(cfg, n, generator=torch.Generator().manual_seed(seed), image_seq_len=seq)
    assert t.dtype == torch.float32 and t.shape == (n,)
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    return t.double().numpy()


def ks(samples: np.ndarray, cdf) -> float:
    return stats.kstest(samples, cdf).pvalue


# --- samplers vs scipy ------------------------------------------------------------------------------------------


def test_uniform_matches_scipy():
    assert ks(draw(ObjectiveConfig(timestep_sampler="uniform")), stats.uniform().cdf) > P_MIN


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 1.3)])
def test_logit_normal_matches_scipy(mean, std):
    t = draw(ObjectiveConfig(timestep_sampler="logit_normal", logit_mean=mean, logit_std=std))
    assert ks(logit(t), stats.norm(mean, std).cdf) > P_MIN


def test_beta_matches_scipy_libreflux_params():
    t = draw(ObjectiveConfig(timestep_sampler="beta", beta_alpha=2.0, beta_beta=1.6))
    assert ks(t, stats.beta(2.0, 1.6).cdf) > P_MIN


def test_chroma_matches_its_density():
    """KS against the analytic CDF of p(t) ∝ −7.7·(t − ½)² + 2, integrated by hand, not through the sampler's code."""
    t = draw(ObjectiveConfig(timestep_sampler="chroma"))
    z = 2.0 - 7.7 / 12.0

    def cdf(x):
        x = np.clip(x, 0.0, 1.0)
        return (2.0 * x - 7.7 / 3.0 * ((x - 0.5) ** 3 + 0.125)) / z

    assert ks(t, cdf) > P_MIN
    assert ks(t, stats.uniform().cdf) < P_MIN  # it is not uniform: the test can fail
    # The inverse is exact: F(F⁻¹(u)) = u to rounding, across the whole unit interval (tails included).
    u = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    x = objective.chroma_inverse_cdf(u)
    np.testing.assert_allclose(cdf(x.numpy()), u.numpy(), atol=1e-12, rtol=0)
    assert bool((x.diff() > 0).all()) and abs(float(x[0])) < 1e-12 and abs(float(x[-1]) - 1) < 1e-12
    # Chroma's own sampler (searchsorted on a 1000-point grid of the density) agrees with it.
    grid = np.linspace(0, 1, 1000)
    dens = -7.7 * (grid - 0.5) ** 2 + 2
    ref = grid[np.searchsorted(np.cumsum(dens / dens.sum()), np.random.default_rng(0).random(N), side="right")]
    assert stats.ks_2samp(t, ref).pvalue > P_MIN


def test_chroma_consumes_the_generator_as_uniform_and_beta_do():
    """Same draws from the generator (one uniform per sample), so switching sampler keeps every later draw."""
    for other in ("uniform", "beta"):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        objective.sample_timesteps(ObjectiveConfig(timestep_sampler="chroma"), 17, generator=g1, image_seq_len=SEQ)
        objective.sample_timesteps(ObjectiveConfig(timestep_sampler=other), 17, generator=g2, image_seq_len=SEQ)
        assert torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))
    u = torch.rand(17, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = objective.sample_timesteps(
        ObjectiveConfig(timestep_sampler="chroma"), 17, generator=torch.Generator().manual_seed(3), image_seq_len=SEQ
    )
    torch.testing.assert_close(t, objective.chroma_inverse_cdf(u).clamp(objective.T_EPS, 1 - objective.T_EPS).float())


def test_samplers_are_distinguishable():
    # The KS tests above must be able to fail: Beta(2, 1.6) samples are rejected as Beta(2, 2) or as uniform.
    t = draw(ObjectiveConfig(timestep_sampler="beta", beta_alpha=2.0, beta_beta=1.6))
    assert ks(t, stats.beta(2.0, 2.0).cdf) < P_MIN
    assert ks(t, stats.uniform().cdf) < P_MIN


# --- temperature -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_tempered_logit_normal_is_logit_normal_with_scaled_std(temperature):
    t = draw(ObjectiveConfig(timestep_sampler="logit_normal", logit_mean=0.3, logit_std=0.9, temperature=temperature))
    assert ks(logit(t), stats.norm(0.3, 0.9 * temperature).cdf) > P_MIN
    assert ks(logit(t), stats.norm(0.3, 0.9).cdf) < P_MIN  # and it did change the distribution


def test_tempered_beta_scales_logit_spread_around_the_median():
    a, b, temp = 2.0, 1.6, 1.5
    t = draw(ObjectiveConfig(timestep_sampler="beta", beta_alpha=a, beta_beta=b, temperature=temp))
    m = logit(stats.beta(a, b).median())
    base = expit(m + (logit(t) - m) / temp)  # undo the temperature: must be Beta(a, b) again
    assert ks(base, stats.beta(a, b).cdf) > P_MIN
    assert abs(np.median(t) - stats.beta(a, b).median()) < 0.02  # the median is the fixed point


def test_temperature_one_is_identity():
    cfg = ObjectiveConfig(timestep_sampler="beta")
    t1 = draw(cfg, n=64)
    t2 = draw(ObjectiveConfig(timestep_sampler="beta", temperature=1.0 + 1e-9), n=64)
    np.testing.assert_allclose(t1, t2, atol=1e-6)


def test_timesteps_are_clamped_away_from_0_and_1():
    # std 40 in logit space puts most draws beyond float precision of 0 and 1: the clamp must catch them.
    t = objective.sample_timesteps(ObjectiveConfig(timestep_sampler="logit_normal", logit_std=40.0), 1000,
                                   generator=torch.Generator().manual_seed(0), image_seq_len=SEQ)
    lo, hi = torch.tensor(objective.T_EPS), torch.tensor(1 - objective.T_EPS)  # as float32
    assert float(t.min()) == float(lo) and float(t.max()) == float(hi)
    assert torch.isfinite(torch.logit(t)).all()


# --- shift -----------------------------------------------------------------------------------------------------


def test_constant_shift_matches_transformed_distribution():
    s, mean, std = 3.0, 0.0, 1.0
    t = draw(ObjectiveConfig(timestep_sampler="logit_normal", shift="constant", shift_value=s))
    # t' = s·u / (1 + (s-1)·u)  <=>  u = t' / (s - (s-1)·t'), so P(t' <= x) = P(u <= u(x)).
    base_cdf = stats.norm(mean, std).cdf
    assert ks(t, lambda x: base_cdf(logit(x / (s - (s - 1) * x)))) > P_MIN
    assert ks(t, lambda x: base_cdf(logit(x))) < P_MIN  # unshifted is rejected


def test_shift_formula_endpoints_and_value():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    out = objective.shift_timesteps(t, 3.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("seq", [256, 1024, 4096, 8192])
def test_resolution_shift_matches_diffusers_calculate_shift(seq):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = ObjectiveConfig()
    assert objective.resolution_shift(seq, cfg) == pytest.approx(math.exp(calculate_shift(seq)), rel=1e-12)
    other = ObjectiveConfig(base_shift=0.3, max_shift=1.4, base_seq_len=128, max_seq_len=2048)
    ref = calculate_shift(seq, base_seq_len=128, max_seq_len=2048, base_shift=0.3, max_shift=1.4)
    assert objective.resolution_shift(seq, other) == pytest.approx(math.exp(ref), rel=1e-12)


def test_resolution_shift_sampling_equals_diffusers_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    base = draw(ObjectiveConfig(timestep_sampler="uniform"), n=256, seq=4096)
    shifted = draw(ObjectiveConfig(timestep_sampler="uniform", shift="resolution"), n=256, seq=4096)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref = sched.time_shift(calculate_shift(4096), 1.0, base)
    np.testing.assert_allclose(shifted, ref, rtol=1e-5)
    assert np.all(shifted > base)  # a real shift happened (s = exp(1.15) > 1)


# --- determinism -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal", "beta", "chroma"])
def test_sampling_is_determined_by_the_generator_only(sampler):
    cfg = ObjectiveConfig(timestep_sampler=sampler, temperature=1.3, shift="resolution")
    torch.manual_seed(0)
    a = draw(cfg, n=32, seed=7)
    torch.manual_seed(99)  # the global RNG must not matter
    b = draw(cfg, n=32, seed=7)
    c = draw(cfg, n=32, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g = torch.Generator().manual_seed(5)
    m1 = objective.caption_dropout_mask(64, 0.5, generator=g)
    m2 = objective.caption_dropout_mask(64, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2)


# --- caption dropout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.1, 0.447])
def test_caption_dropout_frequency(p):
    mask = objective.caption_dropout_mask(N, p, generator=torch.Generator().manual_seed(3))
    assert mask.dtype == torch.bool and mask.shape == (N,)
    lo, hi = stats.binom.interval(0.999, N, p)
    assert lo <= int(mask.sum()) <= hi


def test_caption_dropout_extremes():
    g = torch.Generator().manual_seed(0)
    assert not objective.caption_dropout_mask(1000, 0.0, generator=g).any()
    assert objective.caption_dropout_mask(1000, 1.0, generator=g).all()


# --- interpolation, target, loss -------------------------------------------------------------------------------


def test_interpolate_endpoints_and_midpoint():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 4, generator=g)
    eps = torch.randn(3, 5, 4, generator=g)
    out = objective.interpolate(x0, eps, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(out[0], x0[0])
    assert torch.equal(out[1], eps[1])
    torch.testing.assert_close(out[2], 0.75 * x0[2] + 0.25 * eps[2])
    torch.testing.assert_close(objective.velocity_target(x0, eps), eps - x0)
    # v is the derivative of x_t in t
    t, h = torch.full((3,), 0.4), 1e-3
    fd = (objective.interpolate(x0, eps, t + h) - objective.interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, objective.velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([0.5, 0.0])
    # squared errors: [[1, 0], [4, 9]] -> per-sample means [0.5, 6.5] -> mean 3.5
    loss, per = objective.flow_matching_loss(pred, target, t)
    torch.testing.assert_close(per, torch.tensor([0.5, 6.5]))
    torch.testing.assert_close(loss, torch.tensor(3.5))
    # cosmap: w(0.5) = 2/(π·0.5) = 4/π, w(0) = 2/π -> [2/π, 13/π], mean 7.5/π
    loss, per = objective.flow_matching_loss(pred, target, t, weighting="cosmap")
    torch.testing.assert_close(per, torch.tensor([2 / math.pi, 13 / math.pi]))
    torch.testing.assert_close(loss, torch.tensor(7.5 / math.pi))


def test_loss_is_fp32_for_bf16_inputs():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.bfloat16)
    loss, per = objective.flow_matching_loss(pred, target, torch.tensor([0.1, 0.9]))
    assert loss.dtype == torch.float32 and per.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(3.5))


def test_unknown_weighting_names_the_key():
    with pytest.raises(ValueError, match="objective.loss_weighting"):
        objective.flow_matching_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), weighting="snr")


# --- inference schedule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,seq", [(4, 256), (28, 1024), (50, 4096), (1, 64)])
@pytest.mark.parametrize("schedule", [objective.DEV_SCHEDULE, objective.SCHNELL_SCHEDULE,
                                      objective.SamplingSchedule(dynamic=False, shift=3.0),
                                      objective.SamplingSchedule(dynamic=True, base_shift=0.3, max_shift=1.4,
                                                                 base_seq_len=128, max_seq_len=2048)],
                         ids=["dev", "schnell", "constant3", "dynamic-custom"])
def test_sampling_sigmas_equal_diffusers_scheduler(steps, seq, schedule):
    """Bit for bit what FluxPipeline gets from a FlowMatchEulerDiscreteScheduler with this schedule's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = schedule.scheduler_config()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **cfg)
    mu = calculate_shift(seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # exactly FluxPipeline's call
    ours = objective.sampling_sigmas(steps, image_seq_len=seq, schedule=schedule)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32
    assert ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.equal(ours, sched.sigmas), (ours - sched.sigmas).abs().max()
    assert torch.all(ours[1:] < ours[:-1])


# --- minibatch OT noise pairing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pairing", ["ot_cosine", "ot_l2"])
def test_ot_pairing_is_a_permutation_that_lowers_the_cost(pairing):
    g = torch.Generator().manual_seed(0)
    # Latents with structure (a shared mean direction plus per-sample offsets), as real latents have.
    x0 = torch.randn(1, 64, 16, generator=g) + 0.7 * torch.randn(32, 64, 16, generator=g)
    noise = torch.randn(32, 64, 16, generator=g)
    paired = objective.pair_noise(x0, noise, pairing)
    # A permutation of the noise rows: both marginals are unchanged as multisets, each row used once.
    match = [(paired[i] == noise).flatten(1).all(1).nonzero().flatten().tolist() for i in range(32)]
    assert all(len(m) == 1 for m in match) and sorted(m[0] for m in match) == list(range(32))
    assert torch.equal(paired.flatten().sort().values, noise.flatten().sort().values)
    cost = objective.pairing_cost(x0, noise, pairing)
    perm = torch.tensor([m[0] for m in match])
    identity, ot = cost.diagonal().mean(), cost[torch.arange(32), perm].mean()
    assert ot < identity  # the assignment lowers the mean pair cost (it is optimal, so never raises it)
    # Optimal: no random permutation beats it.
    for s in range(200):
        p = torch.randperm(32, generator=torch.Generator().manual_seed(s))
        assert cost[torch.arange(32), p].mean() >= ot - 1e-12


def test_ot_cost_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 7, 3, generator=g), torch.randn(5, 7, 3, generator=g)
    x, e = x0.flatten(1).double(), noise.flatten(1).double()
    cos = torch.nn.functional.cosine_similarity(x[:, None], e[None], dim=2)
    torch.testing.assert_close(objective.pairing_cost(x0, noise, "ot_cosine"), -cos)
    torch.testing.assert_close(objective.pairing_cost(x0, noise, "ot_l2"), torch.cdist(x, e).square())


def test_no_pairing_is_todays_noise():
    noise = torch.randn(4, 8, 16)
    assert objective.pair_noise(torch.randn(4, 8, 16), noise, "none") is noise
    with pytest.raises(ValueError, match="objective.noise_pairing"):
        ObjectiveConfig(noise_pairing="ot")


def test_schnell_schedule_is_unshifted_and_dev_shifts_towards_noise():
    plain = torch.linspace(1.0, 0.25, 4)
    assert torch.equal(objective.sampling_sigmas(4, 1024, schedule=objective.SCHNELL_SCHEDULE)[:-1], plain)
    assert torch.all(objective.sampling_sigmas(4, 1024, schedule=objective.DEV_SCHEDULE)[1:-1] > plain[1:])


def test_schedule_round_trips_through_a_scheduler_config_and_refuses_what_it_cannot_sample():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for s in (objective.DEV_SCHEDULE, objective.SCHNELL_SCHEDULE, objective.SamplingSchedule(dynamic=False, shift=2.5)):
        cfg = dict(FlowMatchEulerDiscreteScheduler(**s.scheduler_config()).config)
        assert objective.SamplingSchedule.from_scheduler_config(cfg) == s
    # FlowMatchEulerDiscreteScheduler's defaults (a model dir without these keys): no shift
    assert objective.SamplingSchedule.from_scheduler_config({}) == objective.SCHNELL_SCHEDULE
    for bad in ({"use_karras_sigmas": True}, {"shift_terminal": 0.1}, {"time_shift_type": "linear"},
                {"_class_name": "EulerDiscreteScheduler"}):
        with pytest.raises(ValueError, match="sched.json"):
            objective.SamplingSchedule.from_scheduler_config(bad, source="sched.json")
