"""FLUX -> a Chroma pipeline dir, the file side of `dedistill prune` (its CLI: launch/prune.py).

DIR is what `ChromaPipeline.from_pretrained(DIR)` loads: the pruned transformer (`ChromaTransformer2DModel`), FLUX's
T5 encoder and tokenizer (as `text_encoder`/`tokenizer`), VAE and scheduler; CLIP is left behind, as Chroma has no
pooled input. `DIR/prune_report.json` holds the parameter counts, the approximator's regression error and the
pruned transformer's velocity error against FLUX on held-out prompts and timesteps (the maths: tools/prune.py).

Device: `--device auto` fits on CUDA when there is one. At FLUX.1 size this is a GPU job (the fit regresses 344
vectors of width 3072 through a 5120-wide MLP, and the check runs both 12B/8.9B transformers); the tiny pipeline
runs on the CPU in seconds.
"""

from __future__ import annotations

import json
from functools import partial
import shutil
import time
from pathlib import Path

import diffusers
import torch
from streaming import LocalDataset

from tools.prune import (
    FitSettings, ForcedModulation, ModulationTarget, approximator_error, chroma_velocity, fit_approximator,
    parameter_count, prune_transformer,
)
from train.flux import image_ids, predict_velocity
from train.model import cast_model, check_model_dir, load_transformer, resolve_dtype
from train.outputs import atomic_output_dir
from train.text import PromptEmbeds, TextEncoder

REPORT = "prune_report.json"


def read_captions(path: str | Path) -> list[str]:
    """Distinct captions, in file order: a text file (one per line, `#` comments skipped) or an MDS dir's `caption`
    column (e.g. `dedistill tiny-data` or `data convert` output)."""
    p = Path(path)
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        captions = [ln for ln in lines if ln and not ln.startswith("#")]
    elif (p / "index.json").is_file():
        ds = LocalDataset(local=str(p))
        if len(ds) and "caption" not in ds[0]:
            raise ValueError(f"--captions: MDS samples in {p} have no 'caption' column")
        captions = [str(ds[i]["caption"]).strip() for i in range(len(ds))]
    else:
        raise ValueError(f"--captions: '{p}' is neither a text file nor an MDS dir (no index.json)")
    return list(dict.fromkeys(c for c in captions if c))


def split_captions(captions: list[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(fit, held out): a seeded shuffle, the last `held_out` kept for the velocity check only."""
    if held_out < 1:
        raise ValueError(f"--eval-prompts: must be at least 1, got {held_out}")
    if len(captions) < held_out + 1:
        raise ValueError(f"--captions: {len(captions)} distinct captions; need more than --eval-prompts {held_out}")
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [captions[i] for i in order]
    return shuffled[:-held_out], shuffled[-held_out:]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} asked for, but CUDA is not available")
    return device


def _vae_factor(model: Path) -> int:
    cfg = json.loads((model / "vae" / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def write_pipeline_dir(model: Path, tmp: Path, chroma, dtype: torch.dtype) -> None:
    """ChromaPipeline's layout from FLUX's: T5 becomes `text_encoder`, CLIP is dropped."""
    cast_model(chroma, dtype).save_pretrained(str(tmp / "transformer"), safe_serialization=True)
    for src, dst in (("text_encoder_2", "text_encoder"), ("tokenizer_2", "tokenizer"), ("vae", "vae"),
                     ("scheduler", "scheduler")):
        shutil.copytree(model / src, tmp / dst)
    flux_index = json.loads((model / "model_index.json").read_text())
    index = {
        "_class_name": "ChromaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": flux_index["scheduler"],
        "vae": flux_index["vae"],
        "text_encoder": flux_index["text_encoder_2"],
        "tokenizer": flux_index["tokenizer_2"],
        "transformer": ["diffusers", "ChromaTransformer2DModel"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def run_prune(
    model: str | Path,
    out: str | Path,
    captions: str | Path,
    *,
    fit=None,
    eval_prompts: int = 8,
    eval_timesteps: int = 8,
    eval_resolution: int = 256,
    approximator_hidden: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_text_tokens: int = 512,
    log=print,
) -> dict:
    """Prune, fit, check, write DIR; returns the report (also DIR/prune_report.json)."""
    t0 = time.perf_counter()
    fit = fit or FitSettings()
    model = check_model_dir(model, key="--model")
    fit_caps, held_caps = split_captions(read_captions(captions), eval_prompts, fit.seed)
    if eval_timesteps < 1:
        raise ValueError(f"--eval-timesteps: must be at least 1, got {eval_timesteps}")
    factor = _vae_factor(model)
    if eval_resolution % (2 * factor):
        raise ValueError(f"--eval-resolution: {eval_resolution} is not a multiple of {2 * factor}")
    dev = _device(device)
    dt = resolve_dtype(dtype, dev)
    out = Path(out)

    with atomic_output_dir(out) as tmp:  # refuses a non-empty DIR before any work; DIR appears only when complete
        flux = load_transformer(model, dtype=dt)
        chroma, dropped = prune_transformer(flux, approximator_hidden=approximator_hidden, seed=fit.seed)
        dropped_names = set(dropped)
        counts = dict(flux=parameter_count(flux), chroma=parameter_count(chroma),
                      approximator=parameter_count(chroma.distilled_guidance_layer),
                      dropped=sum(p.numel() for n, p in flux.named_parameters() if n in dropped_names))
        log(f"[prune] FLUX {counts['flux']:,} parameters -> Chroma {counts['chroma']:,} "
            f"(dropped {counts['dropped']:,} in {len(dropped)} tensors, approximator {counts['approximator']:,})")

        pooled_fit, held = _encode_captions(model, fit_caps, held_caps, dt=dt, dev=dev, max_text_tokens=max_text_tokens)
        log(f"[prune] {len(fit_caps)} captions to fit on, {len(held_caps)} held out; device {dev}")
        t_eval = torch.rand(eval_timesteps, generator=torch.Generator().manual_seed(fit.seed + 1)).to(dev)
        approx, exact_mean = _fit_and_check_approximator(flux, chroma, pooled_fit, held.pooled, t_eval, fit,
                                                        dev=dev, log=log)

        # Velocity on held-out prompts and timesteps, one prompt at a time with its padding trimmed (no mask
        # needed in either model: exactly the masked forward), the same noise and x_t for both models.
        h = w = eval_resolution // factor
        gen = torch.Generator().manual_seed(fit.seed + 2)
        x_t = torch.randn(len(held_caps), eval_timesteps, (h // 2) * (w // 2), flux.config.in_channels,
                          generator=gen).to(dev, dt)
        ids = image_ids(h, w, device=dev, dtype=dt)
        prompts = [held.select(torch.tensor([i])).trimmed().to(dev) for i in range(len(held_caps))]
        batch = partial(_repeated, n=eval_timesteps)
        with torch.no_grad():
            torch.nn.Module.to(flux, dev, dt)  # not ModelMixin.to, which warns on dtype casts (train/model.py)
            v_flux = torch.stack([predict_velocity(flux, x_t[i], t_eval, batch(p), ids).float()
                                  for i, p in enumerate(prompts)])
            del flux  # chroma holds its own (CPU) references to the block tensors; the device copies go
            torch.nn.Module.to(chroma, dev, dt).eval()
            v_chroma = torch.stack([chroma_velocity(chroma, x_t[i], t_eval, p.t5, ids).float()
                                    for i, p in enumerate(prompts)])
            with ForcedModulation(chroma, exact_mean):
                v_mean = torch.stack([chroma_velocity(chroma, x_t[i], t_eval, p.t5, ids).float()
                                      for i, p in enumerate(prompts)])
        ref_rms = v_flux.pow(2).mean().sqrt().item()
        rmse = (v_chroma - v_flux).pow(2).mean().sqrt().item()
        floor = (v_mean - v_flux).pow(2).mean().sqrt().item()
        velocity = dict(rmse=rmse, reference_rms=ref_rms, rel_error=rmse / ref_rms, exact_mean_rmse=floor,
                        exact_mean_rel_error=floor / ref_rms, prompts=len(held_caps), timesteps=eval_timesteps,
                        resolution=eval_resolution, dtype=str(dt).removeprefix("torch."))

        chroma.to("cpu")
        write_pipeline_dir(model, tmp, chroma, dt)
        report = dict(
            source=str(model.resolve()), captions=dict(path=str(Path(captions).resolve()), fit=len(fit_caps),
                                                       held_out=len(held_caps)),
            parameters=counts, dropped_tensors=len(dropped),
            approximator=dict(**approx, lr=fit.lr, batch_size=fit.batch_size, seed=fit.seed,
                              target="mean over the fit captions' pooled embeddings"),
            velocity=velocity, device=str(dev), seconds=round(time.perf_counter() - t0, 1),
        )
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _log_result(report, log)
    log(str(out))
    return report


def _encode_captions(model: Path, fit_caps: list[str], held_caps: list[str], *, dt, dev, max_text_tokens: int
                     ) -> tuple[torch.Tensor, PromptEmbeds]:
    """CLIP's pooled vectors of the fit captions, and the held-out captions encoded (masked); the encoders are freed."""
    text = TextEncoder(model, dtype=dt, device=dev)
    pooled_fit = torch.cat([text.pooled(fit_caps[i : i + 64]) for i in range(0, len(fit_caps), 64)])
    return pooled_fit, text.encode(held_caps, max_tokens=max_text_tokens, masked=True)


def _fit_and_check_approximator(flux, chroma, pooled_fit, pooled_held, t_eval, fit, *, dev, log
                                ) -> tuple[dict, torch.Tensor]:
    """Fit Chroma's approximator to FLUX's caption-mean modulation, and measure it on held-out captions and
    timesteps: (its error report, the exact caption-mean modulation for the floor). The fit runs in fp32 whatever the
    model dtype: the conditioning path (shared with `flux`) and the approximator."""
    target = ModulationTarget(flux, pooled_fit).to(dev, torch.float32)
    chroma.time_text_embed.to(dev, torch.float32)
    chroma.distilled_guidance_layer.to(dev, torch.float32)
    losses = fit_approximator(chroma, target, fit, log=log)
    held_text = target.embed_pooled(pooled_held.to(dev, torch.float32))
    approx = approximator_error(chroma, target, t_eval, held_text)
    approx.update(steps=fit.steps, final_mse=losses[-1])
    return approx, target.mean(t_eval)


def _repeated(p: PromptEmbeds, *, n: int) -> PromptEmbeds:
    """One prompt's embeddings as a batch of n rows (one per timestep)."""
    return PromptEmbeds(p.t5.expand(n, -1, -1), p.mask.expand(n, -1), p.pooled.expand(n, -1), p.lengths * n)


def _log_result(report: dict, log) -> None:
    approx, v = report["approximator"], report["velocity"]
    log(f"[prune] approximator: rel error {approx['rel_error']:.3e} vs the caption-mean modulation on "
        f"{v['timesteps']} held-out timesteps (held-out captions' own spread around that mean: "
        f"{approx['caption_spread_rel']:.3e})")
    log(f"[prune] velocity vs FLUX on {v['prompts']} held-out prompts x {v['timesteps']} timesteps: rel error "
        f"{v['rel_error']:.3e} (rmse {v['rmse']:.3e}, FLUX rms {v['reference_rms']:.3e}; with the exact caption mean "
        f"instead of the approximator {v['exact_mean_rel_error']:.3e})")
