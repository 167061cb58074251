"""The one sampling-settings type: what `evals.sampler.generate` needs to draw an image with real CFG.

Every entry point builds it the same way, `SamplingSettings.from_source(source, **run)`: the knobs a user sets are
read by name from the entry point's own settings (a run's `sample:` config, an eval suite's `sampling:`, the
`dedistill sample` flags), and what belongs to the model (its text mask, visible padding and sigma schedule) comes
from the run. A knob added here therefore reaches the sampler from each entry point that names it
(tests/unit/test_sampling_settings.py checks that every entry point names every knob).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from train.config import ImageKnobs, JobConfig
from train.objective import DEV_SCHEDULE, SamplingSchedule

USER_KNOBS = ("steps", "cfg_scale", "negative_prompt", "resolution", "seed", "noise_temperature", "cfg_skip_steps",
              "cfg_rescale", "batch_size", "max_text_tokens")
"""What a user sets, by the same name in a run's `sample:`, an eval suite's `sampling:` and the CLI flags."""
MODEL_KNOBS = ("masked", "visible_padding_tokens", "schedule")
"""What must match how the model was trained: taken from the run (or the model dir), never from the user's knobs."""


@dataclass(kw_only=True)
class SamplingSettings(ImageKnobs):
    """One setting of a sampling job: the image knobs (`train.config.ImageKnobs`), its steps and cfg scale, and the
    model's text handling and schedule."""

    steps: int = 28
    cfg_scale: float = 3.5
    max_text_tokens: int = 512
    masked: bool = True
    """Bool T5 padding mask in joint attention (must match how the model was trained)."""
    visible_padding_tokens: int = 0
    """Pads left visible after each prompt: the run's objective.visible_padding_tokens (must match training)."""
    schedule: SamplingSchedule = DEV_SCHEDULE
    """The sigma schedule (callers pass the model's: `Loaded.schedule`); FLUX.1-dev's dynamic shift by default."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.visible_padding_tokens < 0:
            raise ValueError(f"visible_padding_tokens: must be >= 0, got {self.visible_padding_tokens}")

    @classmethod
    def from_source(cls, source, **given) -> "SamplingSettings":
        """The user knobs `source` has an attribute for (a config dataclass, an argparse namespace), then `given`
        (what the entry point decides itself: the model's knobs, a cfg scale of its grid)."""
        names = {f.name for f in fields(cls)}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"not sampling settings: {sorted(unknown)}")
        taken = {k: getattr(source, k) for k in USER_KNOBS if k not in given and hasattr(source, k)}
        return cls(**taken, **given)

    def with_cfg(self, cfg_scale: float) -> "SamplingSettings":
        return replace(self, cfg_scale=cfg_scale)


def run_sampling_settings(cfg: JobConfig, *, schedule: SamplingSchedule, cfg_scale: float | None = None) -> SamplingSettings:
    """A run's `sample:` settings with its model's text handling (`objective`) and sigma schedule: what the
    end-of-run grid and the export's model card sample with."""
    return SamplingSettings.from_source(
        cfg.sample, cfg_scale=cfg.sample.cfg_scales[0] if cfg_scale is None else cfg_scale,
        max_text_tokens=cfg.objective.max_text_tokens, masked=cfg.objective.attention_mask,
        visible_padding_tokens=cfg.objective.visible_padding_tokens, schedule=schedule)
