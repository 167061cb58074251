"""`dedistill prune --model FLUX_DIR --out DIR [--captions CAPTIONS]`: FLUX -> a Chroma pipeline dir (the work:
tools/prune_pipeline.py; the maths: tools/prune.py)."""

from __future__ import annotations

from pathlib import Path

# used when --captions is not given, so the documented `prune --model FLUX_DIR --out DIR` works as typed
DEFAULT_CAPTIONS = Path(__file__).parent / "assets" / "prune_captions.txt"


def cmd_prune(a) -> None:
    # deferred: `dedistill --help` imports every command's parser, and this pulls in torch and diffusers
    from tools.prune import FitSettings
    from tools.prune_pipeline import run_prune

    fit = FitSettings(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    run_prune(a.model, a.out, a.captions, fit=fit, eval_prompts=a.eval_prompts, eval_timesteps=a.eval_timesteps,
              eval_resolution=a.eval_resolution, approximator_hidden=a.approximator_hidden, device=a.device,
              dtype=a.dtype, max_text_tokens=a.max_text_tokens)


def register(sub) -> None:
    s = sub.add_parser("prune", help="FLUX -> Chroma: drop the modulation Linears, fit the approximator")
    s.add_argument("--model", required=True, help="diffusers FLUX dir (FLUX.1-schnell style)")
    s.add_argument("--out", required=True, help="new dir: a ChromaPipeline pipeline + prune_report.json")
    s.add_argument("--captions", default=str(DEFAULT_CAPTIONS),
                   help="caption set whose CLIP pooled embeddings the modulation is averaged over: a text file (one "
                   "per line) or an MDS dir with a `caption` column (default: 120 varied captions shipped with "
                   "dedistill; pass your training captions for a target closer to your data)")
    s.add_argument("--steps", type=int, default=2000, help="approximator fitting steps")
    s.add_argument("--batch-size", type=int, default=16, help="timesteps per fitting step")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-prompts", type=int, default=8, help="captions held out for the velocity check")
    s.add_argument("--eval-timesteps", type=int, default=8, help="held-out timesteps for both checks")
    s.add_argument("--eval-resolution", type=int, default=256, help="image size (px) of the velocity check")
    s.add_argument("--approximator-hidden", type=int, default=None,
                   help="approximator width (default: 5/3 of the transformer's, Chroma's 5120 at FLUX.1 size)")
    s.add_argument("--max-text-tokens", type=int, default=512)
    s.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="saved weights and the velocity check (auto: bf16 on CUDA, fp32 on CPU); the fit is fp32")
    s.set_defaults(func=cmd_prune)
