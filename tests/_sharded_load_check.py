"""Test helper (run under torchrun by tests/integration/test_sharded_load.py): the trainer's sharded load, gathered, against a
plain `FluxTransformer2DModel.from_pretrained` (base weights) and the unsharded load + adapter (adapter weights).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_sharded_load_check.py MODEL_DIR \
        [a.b=v ...] [-- a.b=v ...]

Each `--`-separated group of overrides is one check in the same process group (one launch, not one per setting).
Rank 0 prints `SHARDED_LOAD_OK <group> <n tensors> <max local rows> <max full rows>` when every gathered tensor of that
group's model is bitwise equal.
"""

import sys
from pathlib import Path

import torch

from train.adapters import apply_adapter
from train.config import load_config
from train.build import build_model
from train.model import load_transformer
from train.parallel.load import file_key
from train.parallelize import destroy_distributed, init_distributed

REPO = Path(__file__).resolve().parents[1]


def main(model_dir: str, *args: str) -> None:
    groups, info = [[]], None
    for a in args:
        if a == "--":
            groups.append([])
        else:
            groups[-1].append(a)
    for i, overrides in enumerate(groups):
        cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"model.path={model_dir}", *overrides])
        info = info or init_distributed(cfg.parallel)
        check(model_dir, cfg, info, group=i)
    destroy_distributed()


def check(model_dir: str, cfg, info, *, group: int) -> None:
    torch.manual_seed(cfg.seed)
    backend, dtype = build_model(cfg, info)
    named = dict(backend.model.named_parameters())
    local_rows = max(p.to_local().shape[0] for p in named.values() if p.dim())
    gathered = {n: p.full_tensor().detach() for n, p in named.items()}  # a collective: every rank calls it

    if info.is_main:
        from diffusers import FluxTransformer2DModel

        plain = FluxTransformer2DModel.from_pretrained(str(Path(model_dir) / "transformer"), torch_dtype=dtype)
        base = dict(plain.named_parameters())
        torch.manual_seed(cfg.seed)
        unsharded = load_transformer(model_dir, dtype=dtype)
        apply_adapter(unsharded, cfg.model.adapter)
        adapter = {n: p for n, p in unsharded.named_parameters() if p.requires_grad and n not in base}
        assert set(gathered) == {n for n, _ in unsharded.named_parameters()}, "parameter names differ"
        for n, t in gathered.items():
            want = adapter[n].float() if n in adapter else base[file_key(n)]
            want = want.float() if t.dtype == torch.float32 else want
            assert t.dtype == want.dtype and torch.equal(t, want), f"{n}: sharded load differs"
        full = max(t.shape[0] for t in gathered.values() if t.dim())
        print(f"SHARDED_LOAD_OK {group} {len(gathered)} {local_rows} {full}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
