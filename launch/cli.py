"""`dedistill` — one CLI with subcommands. Each subcommand imports its package lazily, so `--help` is instant.

User errors (ValueError) print one line, `dedistill: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from train.quiet import install as quiet_torchao_noise

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIGS / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if candidate.is_file():
        return candidate
    raise ValueError(f"config '{name_or_path}' not found (a YAML path or a preset in {CONFIGS})")


# ---------------------------------------------------------------------------------------------------------------- cmds


def cmd_tiny_model(a) -> None:
    # deferred: a command's modules load only when it runs (`--help` stays fast)
    from dataset_tools.tiny_model import write_tiny_model

    print(write_tiny_model(a.out_dir, seed=a.seed, size=a.size, dtype=a.dtype, family=a.family))


def cmd_tiny_data(a) -> None:
    # deferred: a command's modules load only when it runs (`--help` stays fast)
    from dataset_tools.tiny_data import write_tiny_data

    print(write_tiny_data(a.out_dir, n=a.n, size=a.size, seed=a.seed, fmt=a.format))


def absolutize_paths(cfg) -> None:
    """Runs record absolute paths: a checkpoint must find its base model from any working directory."""
    if cfg.model.path:
        cfg.model.path = str(Path(cfg.model.path).resolve())
    if cfg.data.local:
        cfg.data.local = str(Path(cfg.data.local).resolve())
    cfg.run_dir = str(Path(cfg.run_dir).resolve())


def cmd_train(a) -> None:
    # deferred: a command's modules load only when it runs (`--help` stays fast)
    from evals.periodic import trainer_hooks
    from train.config import load_config
    from train.trainer import train

    cfg = load_config(_preset(a.config), a.overrides)
    absolutize_paths(cfg)
    state = train(cfg, trainer_hooks(cfg))
    if int(os.environ.get("RANK", 0)) == 0 and state.history:
        last = state.history[-1]
        print(f"[dedistill] done: step {state.step}, loss {last['loss']:.4f}, skipped {state.skipped_steps}")


def cmd_sample(a) -> None:
    # deferred: a command's modules load only when it runs (`--help` stays fast)
    from evals.sampler import generate
    from train.inference import load_for_inference, text_settings
    from train.sampling import SamplingSettings

    loaded = load_for_inference(a.model, dtype=a.dtype, ema=a.ema, schedule=a.schedule, shift=a.shift)
    masked, visible = text_settings(a.model, loaded.config)  # a run's, or an export's, or (True, 0)
    if a.no_mask:
        masked = False
    s = SamplingSettings.from_source(a, cfg_scale=a.cfg, masked=masked, visible_padding_tokens=visible,
                                     schedule=loaded.schedule)
    (image,) = generate(loaded.transformer, loaded.vae, loaded.text, [a.prompt], s, dtype=loaded.dtype)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(out)


def cmd_demo(a) -> None:
    """De-distill the shipped toy schnell (2-process torchrun), then student vs de-distilled across cfg (before/after
    table, results JSON, grid, CFG curves), all under `--out`: evals/experiments/demo.py."""
    # deferred: a command's modules load only when it runs (`--help` stays fast)
    from evals.experiments.demo import run_demo

    run_demo(Path(a.out).resolve(), nproc=a.nproc, n_samples=a.n_samples, n_prompts=a.n_prompts,
             overrides=list(a.overrides))


# -------------------------------------------------------------------------------------------------------------- parser


class _IntermixedParser(argparse.ArgumentParser):
    """Positionals (the overrides) may come after options; argparse's intermixed parsing, used as a subparser."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def allow_intermixed(subparser: argparse.ArgumentParser) -> None:
    """`dedistill CMD POSITIONAL --option X key=value`: positionals (overrides) before or after the options, as users
    type them; plain argparse stops collecting `nargs="*"` positionals at the first option."""
    subparser.__class__ = _IntermixedParser



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dedistill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("tiny-model", help="write a tiny random FLUX (or Chroma) pipeline in diffusers layout")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="tiny",
                   help="tiny (default) | full-width (FLUX.1's widths, 1 + 1 blocks, 0.54B) | mid (0.64B, benchmarks)")
    s.add_argument("--dtype", default="fp32", help="stored weights: fp32 (default) | bf16")
    s.add_argument("--family", default="flux",
                   help="flux (default: FluxPipeline) | chroma (ChromaPipeline: ChromaTransformer2DModel, T5, no CLIP) "
                   "| flux-dev (FLUX.1-dev-shaped: a guidance embedder, guidance_embeds true) "
                   "| flux2 (Flux2Pipeline, [dev]-shaped: guidance embedder, Mistral3) "
                   "| flux2-klein (Flux2KleinPipeline: Qwen3, no guidance embedder)")
    s.set_defaults(func=cmd_tiny_model)

    s = sub.add_parser("tiny-data", help="write a tiny procedural captioned dataset (MDS shards or a folder)")
    s.add_argument("out_dir")
    s.add_argument("--n", type=int, default=256)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["mds", "folder"], default="mds")
    s.set_defaults(func=cmd_tiny_data)

    s = sub.add_parser("train", help="run a training job (directly, or under torchrun)")
    s.add_argument("config", help="YAML config path or preset name (configs/)")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="one image with real CFG and the T5 attention mask")
    s.add_argument("--model", required=True, help="diffusers FLUX dir, run dir, or checkpoint dir")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--cfg", type=float, default=3.5)
    s.add_argument("--steps", type=int, default=28)
    s.add_argument("--max-text-tokens", type=int, default=512)
    s.add_argument("--resolution", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--noise-temperature", type=float, default=1.0)
    s.add_argument("--cfg-skip-steps", type=int, default=0)
    s.add_argument("--cfg-rescale", type=float, default=0.0)
    s.add_argument("--no-mask", action="store_true", help="no T5 padding mask (schnell's original behaviour)")
    s.add_argument("--schedule", choices=["dynamic", "model", "constant"], default=None,
                   help="sigma schedule: dynamic (FLUX.1-dev's resolution shift), model (the model dir's scheduler "
                   "config), constant (--shift). Default: a run's sample.schedule; a diffusers dir's own config")
    s.add_argument("--shift", type=float, default=None, help="the shift of --schedule constant")
    s.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("demo", help="de-distill the shipped toy schnell, then before/after across cfg (`make demo`)")
    s.add_argument("--out", default="demo")
    s.add_argument("--nproc", type=int, default=2)
    s.add_argument("--n-samples", type=int, default=2000, help="toy-world training samples")
    s.add_argument("--n-prompts", type=int, default=128, help="held-out eval prompts per cell")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides for the training config")
    s.set_defaults(func=cmd_demo)

    for extra in _EXTENSIONS:
        extra(sub)
    for name in _INTERMIXED:  # `submit CONFIG --nodes 2 a.b=1`, `eval SUITE --checkpoint X a.b=1`
        if name in sub.choices:
            allow_intermixed(sub.choices[name])
    return p


# Commands whose key=value overrides may come before or after their options (registered by other packages).
_INTERMIXED = ("submit", "eval")

# Other packages register their subcommands here (data, submit, eval, fid, export, ...) without editing this file's
# body: command -> the module whose `register(sub)` adds it. main() imports only the module of the command it runs (a
# training rank does not pay for the eval or export code's imports); `--help` and unknown commands import them all.
_EXTENSION_MODULES = {
    "data": "dataset_tools.cli", "submit": "launch.submit_cli", "eval": "evals.cli", "fid": "evals.cli",
    "export": "launch.export_cli", "describe": "launch.describe", "plan": "launch.plan_cli", "prune": "launch.prune",
    "checkpoint": "launch.checkpoint_cli",
}
_BUILTIN = ("tiny-model", "tiny-data", "train", "sample", "demo")
_EXTENSIONS: list = []


def _load_extensions(command: str | None = None) -> None:
    """Register the extension that adds `command`; every extension when `command` is None or unknown."""
    _EXTENSIONS.clear()  # main() may run more than once in a process (tests): register each subcommand once
    if command in _BUILTIN:
        return
    modules = [_EXTENSION_MODULES[command]] if command in _EXTENSION_MODULES else _EXTENSION_MODULES.values()
    for module in dict.fromkeys(modules):
        _EXTENSIONS.append(importlib.import_module(module).register)


def main(argv: list[str] | None = None) -> None:
    quiet_torchao_noise()  # before any subcommand imports diffusers (train/quiet.py says which two lines, and why)
    words = sys.argv[1:] if argv is None else argv
    _load_extensions(next((w for w in words if not w.startswith("-")), None))  # the top level has no option values
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        if os.environ.get("DEDISTILL_DEBUG"):
            raise
        print_error(e)
        raise SystemExit(2) from None


def print_error(e: object) -> None:
    """One `dedistill: error:` line, written in one piece: every rank of a job may print its own, and with
    print()'s separate writes for text and newline two ranks' lines ran together on the shared stderr pipe."""
    sys.stderr.write(f"dedistill: error: {e}\n")  # text and newline in one write (stderr writes through)
    sys.stderr.flush()


if __name__ == "__main__":
    main()
