"""The shipped toy schnell: the proof's stages up to the reflow student, copied into the package as safetensors.

    python -m evals.experiments.toy_schnell            # configs/toy-schnell.yaml, seed 0 -> launch/assets/toy_schnell

It runs `evals.experiments.proof` with `--until distill` (world, judge, VAE, teacher, reflow student; each stage
resumable in `out_dir`), then writes into the asset dir: `pipeline/` (the student, a diffusers FLUX pipeline dir:
transformer, VAE, tokenizers, CLIP, T5, all safetensors), `judge.safetensors` (the toy FID / adherence judge) and
`toy_schnell.json` (the command, the config with its seeds, the sanity checks and the stage times). `dedistill demo`
de-distills this student; tests/unit/test_toy_schnell.py loads it through `train.inference.load_for_inference`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from evals.experiments.proof import ProofConfig, load_proof_config, run
from train.config import from_dict, to_dict

ASSET = Path(__file__).resolve().parents[2] / "launch" / "assets" / "toy_schnell"
PRESET = Path(__file__).resolve().parents[2] / "configs" / "toy-schnell.yaml"
MAX_BYTES = 10 * 2**20  # the repo carries it: pipeline + judge stay under 10 MB


def asset_dir() -> Path:
    """The installed toy schnell (package data of `launch`), with a one-line error when it is missing."""
    if not (ASSET / "pipeline" / "model_index.json").is_file() or not (ASSET / "judge.safetensors").is_file():
        raise ValueError(f"{ASSET}: the shipped toy schnell is missing; rebuild it with "
                         f"`python -m evals.experiments.toy_schnell`")
    return ASSET


def load_asset_config():
    """The ProofConfig the shipped toy schnell was made with (world seed, resolution, judge, VAE, model dims)."""
    return from_dict(ProofConfig, json.loads((asset_dir() / "toy_schnell.json").read_text())["config"])


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def to_bf16(folder: Path) -> None:
    """Rewrite a model folder's safetensors in bf16, as BFL ships FLUX.1-schnell: the loaders cast to `model.dtype` on
    load, and the hidden-128 student is 7.2 MB in fp32, over what the repo carries with the VAE and encoders."""
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})


def build(config: str, overrides: list[str], out: Path, *, smoke: bool = False) -> dict:
    cfg = load_proof_config(config, smoke=smoke, overrides=overrides)
    res = run(cfg, until="distill")
    src = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "student_pipeline", tmp / "pipeline")
    to_bf16(tmp / "pipeline" / "transformer")
    shutil.copy2(src / "judge.safetensors", tmp / "judge.safetensors")
    info = {
        "command": "python -m evals.experiments.toy_schnell " + " ".join(sys.argv[1:]),
        "what": "reflow-distilled student of a CFG teacher (CFG baked in, 4 steps), its pipeline, and the judge",
        "config": to_dict(cfg),
        "sanity": {k: res[k] for k in ("judge_heldout_accuracy", "vae", "judge_accuracy_on_vae_reconstructions")},
        "timings_s": res["timings_s"],
        "torch": torch.__version__,
    }
    (tmp / "toy_schnell.json").write_text(json.dumps(info, indent=2) + "\n")
    n = size_bytes(tmp)
    if n > MAX_BYTES:
        raise ValueError(f"{tmp}: {n / 2**20:.1f} MB, over the 10 MB the repo carries; shrink the config's model")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    print(f"[toy-schnell] {out}: {n / 2**20:.2f} MB; stage times (s) {res['timings_s']}", flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m evals.experiments.toy_schnell", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(PRESET))
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--smoke", action="store_true", help="seconds-long stages (tests), meaningless weights")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the proof config (e.g. out_dir=runs/x)")
    a = p.parse_args(argv)
    try:
        build(a.config, a.overrides, Path(a.out), smoke=a.smoke)
    except ValueError as e:
        print(f"toy_schnell: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
