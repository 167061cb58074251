"""Test helper (run under torchrun by tests/integration/test_quant_ranks.py): `model.base_quant` under FSDP2 on 2 gloo ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_quant_shard_check.py MODEL DATA RUN_DIR

Checks on every rank that the quantized Linears are whole (not DTensors) and the rest is sharded, then trains the
same tiny job with base_quant none and int8; rank 0 prints `RESULT {"none": [losses], "int8": [losses], ...}`.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_runs  # noqa: E402

from train.config import load_config  # noqa: E402
from train.build import build_model  # noqa: E402
from train.parallelize import destroy_distributed, init_distributed  # noqa: E402
from train.quant import QuantizedLinear, is_quantized, quant_target_names  # noqa: E402
from train.trainer import Trainer, TrainerHooks  # noqa: E402


def main(model_dir: str, data_dir: str, run_dir: str) -> None:
    def cfg_for(q: str):
        return load_config(tiny_runs.CONFIG, tiny_runs.overrides(model_dir, data_dir, f"{run_dir}/{q}", steps=4) + [
            f"model.base_quant={q}", "eval.every_steps=0", "ema.decay=0"])

    from torch.distributed.tensor import DTensor

    cfg = cfg_for("int8")
    info = init_distributed(cfg.parallel)
    backend, _ = build_model(cfg, info)
    names = quant_target_names(backend.model)
    assert names, "nothing quantized"
    whole = sharded = 0
    for name in names:
        lin = backend.model.get_submodule(name)
        assert type(lin) is QuantizedLinear and is_quantized(lin.weight), name
        assert not isinstance(lin.weight, DTensor) and tuple(lin.weight.shape) == (lin.out_features, lin.in_features)
        whole += 1
    for name, p in backend.model.named_parameters():
        if isinstance(p, DTensor):
            assert p.to_local().shape[0] == -(-p.shape[0] // 2), name
            sharded += 1
    losses = {"whole": whole, "sharded": sharded}
    for q in ("none", "int8"):
        trainer = Trainer(cfg_for(q), info, TrainerHooks())  # one process group for all (no re-init under torchrun)
        try:
            state = trainer.train()
        finally:
            trainer.close()
        losses[q] = [h["loss"] for h in state.history]
    if info.is_main:
        print("RESULT " + json.dumps(losses), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
