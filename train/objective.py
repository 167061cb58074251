"""Flow-matching maths: timesteps, interpolation, target, loss, caption dropout, the inference schedule.

No model and no data here. Conventions (rectified flow, as FLUX):

    x_t = (1 - t)·x0 + t·ε,      v = dx_t/dt = ε - x0,      t = 1 is pure noise, t = 0 is the clean latent.

Randomness comes only from the `torch.Generator` the caller passes (the trainer derives it from
(seed, rank, step, micro-step)), never from the global RNG, so a resumed run draws exactly what an uninterrupted
one would. Each call draws a fixed number of values from the generator, in a fixed order.

Two temperatures, not to be confused:

- **Timestep-distribution temperature** (`ObjectiveConfig.temperature`, training): scales the spread of the
  timestep sampler in logit space around the base distribution's median m = logit(median):
  t = sigmoid(m + T·(logit(t0) - m)). T = 1 is the identity; T > 1 puts more mass near t = 0 and t = 1, T < 1
  concentrates it around the median. For logit-normal(mean, std) it is exactly logit-normal(mean, std·T).
  The shift (below) is applied after the temperature.
- **Noise temperature** (`SampleConfig.noise_temperature`, sampling): the initial noise x_1 = T_noise·ε of the
  Euler sampler in evals/. T_noise < 1 gives smoother, lower-variance images; it does not touch training.

Shift: t' = s·t / (1 + (s - 1)·t) moves mass towards the noisy end for s > 1. `shift="resolution"` uses FLUX's
rule s = exp(mu), mu linear in the image token count, which is the same rule diffusers' FluxPipeline applies at
inference (`calculate_shift` + the scheduler's exponential `time_shift`: exp(mu) / (exp(mu) + (1/t - 1)), which is
the shift formula above with s = exp(mu)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import betaincinv

from train.config import ObjectiveConfig
from train.flux2 import empirical_mu

T_EPS = 1e-5
"""Sampled timesteps are clamped to [T_EPS, 1 - T_EPS]: t = 0 or 1 exactly makes logit/cosmap weights infinite."""


# ---------------------------------------------------------------------------------------------------------------
# Shift


def mu_for_seq_len(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's mu: linear in image_seq_len through (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)  # diffusers' `calculate_shift`, term for term: the same float result


def resolution_shift(image_seq_len: int, cfg: ObjectiveConfig) -> float:
    """The shift s = exp(mu) FLUX uses for `image_seq_len` packed image tokens (256 at 256², 4096 at 1024²)."""
    mu = mu_for_seq_len(
        image_seq_len,
        base_seq_len=cfg.base_seq_len,
        max_seq_len=cfg.max_seq_len,
        base_shift=cfg.base_shift,
        max_shift=cfg.max_shift,
    )
    return math.exp(mu)


def shift_timesteps(t: torch.Tensor, s: float) -> torch.Tensor:
    """t' = s·t / (1 + (s - 1)·t): monotone, fixes 0 and 1; s > 1 moves mass towards t = 1 (noise)."""
    return s * t / (1 + (s - 1) * t)


def _shift_for(cfg: ObjectiveConfig, image_seq_len: int) -> float:
    if cfg.shift == "none":
        return 1.0
    if cfg.shift == "constant":
        return float(cfg.shift_value)
    if cfg.shift == "resolution":
        return resolution_shift(image_seq_len, cfg)
    raise ValueError(f"objective.shift: {cfg.shift!r} is not one of none, constant, resolution")


# ---------------------------------------------------------------------------------------------------------------
# Timestep sampling

CHROMA_A, CHROMA_B = 7.7, 2.0
"""Chroma's timestep density p(t) ∝ −A·(t − ½)² + B on [0, 1] (lodestone-rock/flow `create_distribution`)."""
_CHROMA_Z = CHROMA_B - CHROMA_A / 12.0  # ∫₀¹ (−A·(t − ½)² + B) dt


def chroma_cdf(t):
    """CDF of Chroma's density: (B·t − (A/3)·((t − ½)³ + ⅛)) / Z, for t in [0, 1] (numpy or torch)."""
    return (CHROMA_B * t - CHROMA_A / 3.0 * ((t - 0.5) ** 3 + 0.125)) / _CHROMA_Z


def chroma_inverse_cdf(u: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `chroma_cdf` (float64): with y = t − ½, F(t) = u is the depressed cubic
    y³ + p·y + q = 0, p = −3B/A, q = 3·(u·Z − B/2 + A/24)/A. The density is positive on [0, 1] (p(0) = B − A/4 > 0),
    so F is increasing there and the root in [−½, ½] is the middle of the cubic's three real roots (k = 1 of the
    trigonometric formula). Chroma itself searches a 1000-point grid; the closed form is exact and as cheap."""
    p = -3.0 * CHROMA_B / CHROMA_A
    q = 3.0 * (u * _CHROMA_Z - CHROMA_B / 2.0 + CHROMA_A / 24.0) / CHROMA_A
    r = 2.0 * math.sqrt(-p / 3.0)
    phi = torch.arccos((1.5 * q / p * math.sqrt(-3.0 / p)).clamp(-1.0, 1.0))
    return 0.5 + r * torch.cos(phi / 3.0 - 2.0 * math.pi / 3.0)


def _base_median(cfg: ObjectiveConfig) -> float:
    """Median of the untempered, unshifted sampler, in t."""
    if cfg.timestep_sampler in ("uniform", "chroma"):  # both symmetric about ½
        return 0.5
    if cfg.timestep_sampler == "logit_normal":
        return 1.0 / (1.0 + math.exp(-cfg.logit_mean))
    if cfg.timestep_sampler == "beta":
        return float(betaincinv(cfg.beta_alpha, cfg.beta_beta, 0.5))
    raise ValueError(
        f"objective.timestep_sampler: {cfg.timestep_sampler!r} is not one of uniform, logit_normal, beta, chroma"
    )


def _sample_base(cfg: ObjectiveConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 on CPU from the base distribution, driven only by `generator`."""
    dev = generator.device
    if cfg.timestep_sampler == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64, device=dev).cpu()
    if cfg.timestep_sampler == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=torch.float64, device=dev).cpu()
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    if cfg.timestep_sampler == "beta":
        # torch.distributions.Beta ignores generators; inverse-CDF sampling is exact and generator-driven.
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev).cpu()
        return torch.from_numpy(np.asarray(betaincinv(cfg.beta_alpha, cfg.beta_beta, u.numpy()), dtype=np.float64))
    if cfg.timestep_sampler == "chroma":
        # One uniform per sample, as uniform and beta draw: the generator advances identically for every sampler.
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev).cpu()
        return chroma_inverse_cdf(u)
    raise ValueError(
        f"objective.timestep_sampler: {cfg.timestep_sampler!r} is not one of uniform, logit_normal, beta, chroma"
    )


def apply_temperature(t: torch.Tensor, temperature: float, median: float) -> torch.Tensor:
    """t -> sigmoid(m + T·(logit(t) - m)), m = logit(median). T = 1 returns t unchanged."""
    if temperature == 1.0:
        return t
    m = math.log(median / (1.0 - median))
    return torch.sigmoid(m + temperature * (torch.logit(t) - m))


def sample_timesteps(
    cfg: ObjectiveConfig, n: int, *, generator: torch.Generator, image_seq_len: int
) -> torch.Tensor:
    """(n,) float32 timesteps in [T_EPS, 1 - T_EPS]: base sampler -> temperature -> shift -> clamp.

    base: uniform | logit_normal(cfg.logit_mean, cfg.logit_std) | beta(cfg.beta_alpha, cfg.beta_beta) | chroma
    (Chroma's quadratic density, used by Chroma with no shift and temperature 1);
    temperature: see the module docstring; shift: none | constant (cfg.shift_value) | resolution (FLUX's rule for
    `image_seq_len` packed tokens). Draws n values from `generator` (CPU or CUDA generator); returns a CPU tensor.
    """
    t = _sample_base(cfg, n, generator)  # (n,) float64
    t = apply_temperature(t, cfg.temperature, _base_median(cfg))
    s = _shift_for(cfg, image_seq_len)
    if s != 1.0:
        t = shift_timesteps(t, s)
    return t.clamp(T_EPS, 1.0 - T_EPS).float()


# ---------------------------------------------------------------------------------------------------------------
# Interpolation, target, loss


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε, t (B,) broadcast over the non-batch dims."""
    t = _bcast(t.to(x0.dtype), x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε - x0, the time derivative of x_t."""
    return noise - x0


def pairing_cost(x0: torch.Tensor, noise: torch.Tensor, pairing: str) -> torch.Tensor:
    """(B, B) float64 cost of pairing latent i with noise j, over the flattened samples.

    ot_cosine: −cos(x0_i, ε_j), Chroma's `cosine_optimal_transport`; ot_l2: ‖x0_i − ε_j‖², the W2 coupling of
    minibatch OT-CFM (Tong et al.) and of the straight-path argument for rectified flow."""
    x, e = x0.flatten(1).double(), noise.flatten(1).double()
    if pairing == "ot_cosine":
        return -(torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(e, dim=1).T)
    if pairing == "ot_l2":
        return (x.square().sum(1)[:, None] + e.square().sum(1)[None, :] - 2.0 * (x @ e.T)).clamp(min=0)
    raise ValueError(f"objective.noise_pairing: {pairing!r} is not one of none, ot_cosine, ot_l2")


def pair_noise(x0: torch.Tensor, noise: torch.Tensor, pairing: str) -> torch.Tensor:
    """`noise` permuted along the batch so that sum_i cost(x0_i, ε_π(i)) is minimal (scipy's Hungarian solver).

    The noise moves, not the latents: each latent keeps its caption, timestep and dropout. Draws nothing from any
    generator and the solver is deterministic, so a resumed step pairs exactly as the uninterrupted one did.
    "none" returns `noise` itself (today's independent pairing, bitwise)."""
    if pairing == "none" or x0.shape[0] < 2:
        return noise
    cost = pairing_cost(x0, noise, pairing).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)  # rows == arange(B)
    return noise[torch.as_tensor(cols[np.argsort(rows)], device=noise.device)]


def loss_weights(t: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """(B,) per-sample weights, or None for "none". cosmap (SD3): 2 / (π·(1 - 2t + 2t²))."""
    if weighting == "none":
        return None
    if weighting == "cosmap":
        t = t.float()
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t * t))
    raise ValueError(f"objective.loss_weighting: {weighting!r} is not one of none, cosmap")


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, *, weighting: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar mean loss, per-sample loss (B,)); MSE over the non-batch dims, in fp32, optionally weighted."""
    diff = pred.float() - target.float()
    per_sample = diff.square().flatten(1).mean(1)  # (B,)
    w = loss_weights(t.to(per_sample.device), weighting)
    if w is not None:
        per_sample = per_sample * w
    return per_sample.mean(), per_sample


def sample_guidance(cfg: ObjectiveConfig, n: int, *, generator: torch.Generator) -> torch.Tensor:
    """(n,) float32 guidance scales w ~ U(lo, hi) (`objective.teacher_guidance`), on the CPU: one uniform per sample
    from `generator` (drawn by the teacher objective only, after the timesteps)."""
    lo, hi = cfg.teacher_guidance
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    return (lo + (hi - lo) * u).float()


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Real classifier-free guidance uncond + w·(cond − uncond), w (B,) broadcast: what the sampler (evals/) and
    FluxPipeline's `true_cfg_scale` compute, and the convention dev's embedded guidance scale was distilled in."""
    return uncond + _bcast(w.to(cond.dtype), cond) * (cond - uncond)


def teacher_loss(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    v_teacher: torch.Tensor,
    w: torch.Tensor,
    t: torch.Tensor,
    *,
    weighting: str = "none",
    data_target: torch.Tensor | None = None,
    data_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reversed guided distillation (docs/recipes.md): (scalar, per-sample (B,)) of

        ‖ v_uncond + w·(v_cond − v_uncond) − v_teacher(x_t, t, c, w) ‖²  (+ λ·‖ v_cond − (ε − x0) ‖²)

    each term a per-sample mean over the non-batch dims in fp32, weighted by `weighting` like the data loss. The
    teacher's output is a constant (no gradient); both student branches get the gradient of the combination."""
    guided = cfg_combine(v_cond.float(), v_uncond.float(), w.float())
    loss, per_sample = flow_matching_loss(guided, v_teacher.float().detach(), t, weighting=weighting)
    if data_weight:
        data, data_per_sample = flow_matching_loss(v_cond, data_target, t, weighting=weighting)
        loss, per_sample = loss + data_weight * data, per_sample + data_weight * data_per_sample
    return loss, per_sample


def caption_dropout_mask(n: int, p: float, *, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool, True = replace that caption by the empty prompt (each independently with probability p)."""
    u = torch.rand(n, generator=generator, device=generator.device).cpu()
    return u < p


# ---------------------------------------------------------------------------------------------------------------
# Inference schedule


@dataclass(frozen=True, kw_only=True)
class SamplingSchedule:
    """The sigma schedule of the Euler sampler, as diffusers' FlowMatchEulerDiscreteScheduler builds it for FLUX.

    dynamic=False: a constant shift, sigma' = shift·sigma / (1 + (shift - 1)·sigma) (FLUX.1-schnell: shift 1.0, i.e.
    no shift). dynamic=True: FLUX.1-dev's resolution-dependent shift, mu linear in the image token count through
    (base_seq_len, base_shift) and (max_seq_len, max_shift), sigma' = exp(mu) / (exp(mu) + 1/sigma - 1).
    """

    dynamic: bool
    shift: float = 1.0
    """The constant shift (ignored when dynamic)."""
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    empirical_mu: bool = False
    """dynamic only: mu from FLUX.2's `compute_empirical_mu(image_seq_len, steps)` instead of the line above."""

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"shift: must be > 0, got {self.shift}")

    def describe(self) -> str:
        if self.dynamic and self.empirical_mu:
            return "dynamic shift (FLUX.2: mu from the image token count and the step count, compute_empirical_mu)"
        if self.dynamic:
            return (f"dynamic shift (FLUX.1-dev: mu from {self.base_shift} at {self.base_seq_len} to {self.max_shift} "
                    f"at {self.max_seq_len} image tokens)")
        return f"constant shift {self.shift:g}" + (" (no shift, FLUX.1-schnell's)" if self.shift == 1.0 else "")

    def scheduler_config(self) -> dict:
        """The FlowMatchEulerDiscreteScheduler config keys that give this schedule in diffusers' FluxPipeline."""
        return {"shift": self.shift, "use_dynamic_shifting": self.dynamic, "base_shift": self.base_shift,
                "max_shift": self.max_shift, "base_image_seq_len": self.base_seq_len,
                "max_image_seq_len": self.max_seq_len}

    @classmethod
    def from_scheduler_config(cls, config: dict, *, source: str = "scheduler config") -> "SamplingSchedule":
        """Read a diffusers FlowMatchEulerDiscreteScheduler config; refuses options this sampler does not implement
        (they would change the schedule silently)."""
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{source}: scheduler '{name}' is not FlowMatchEulerDiscreteScheduler")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling", "shift_terminal", "use_flow_sigmas"):
            if config.get(key):
                raise ValueError(f"{source}: '{key}' is set; dedistill's sampler implements plain/shifted sigmas only")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{source}: time_shift_type '{config['time_shift_type']}' is not supported (exponential)")
        # FluxPipeline reads the mu line with these defaults when a key is absent.
        return cls(
            dynamic=bool(config.get("use_dynamic_shifting", False)),
            shift=float(config.get("shift", 1.0)),
            base_shift=float(config.get("base_shift", 0.5)),
            max_shift=float(config.get("max_shift", 1.15)),
            base_seq_len=int(config.get("base_image_seq_len", 256)),
            max_seq_len=int(config.get("max_image_seq_len", 4096)),
        )


DEV_SCHEDULE = SamplingSchedule(dynamic=True, shift=3.0)
"""FLUX.1-dev's scheduler (shift 3.0 is in its config but unused under dynamic shifting): what a de-distilled model is
sampled with. BFL's reference sampler applies this shift to every FLUX.1 model except schnell."""
SCHNELL_SCHEDULE = SamplingSchedule(dynamic=False, shift=1.0)
"""FLUX.1-schnell's scheduler: no shift, the schedule it was distilled for (1-4 steps)."""


def sampling_sigmas(steps: int, image_seq_len: int, *, schedule: SamplingSchedule) -> torch.Tensor:
    """(steps + 1,) float32 sigmas from 1 down to 0: what diffusers' FluxPipeline gets from `schedule`'s scheduler.

    linspace(1, 1/steps, steps) in float32 (as the scheduler casts it), shifted, then a final 0. Equals
    FlowMatchEulerDiscreteScheduler(**schedule.scheduler_config()).set_timesteps(sigmas=..., mu=mu).sigmas, with the
    same float32 arithmetic, so a pipeline on that scheduler and this sampler step through identical sigmas.
    """
    if steps < 1:
        raise ValueError(f"sample.steps: must be >= 1, got {steps}")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if schedule.dynamic and schedule.empirical_mu:
        mu = empirical_mu(image_seq_len, steps)
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    elif schedule.dynamic:
        mu = mu_for_seq_len(image_seq_len, base_seq_len=schedule.base_seq_len, max_seq_len=schedule.max_seq_len,
                            base_shift=schedule.base_shift, max_shift=schedule.max_shift)
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        sigmas = schedule.shift * sigmas / (1 + (schedule.shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])
