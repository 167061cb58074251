"""Run `dedistill train` with torch.distributed's FSDP collectives wrapped to count their buffers' bytes; rank 0
writes {"all_gather": bytes, "reduce_scatter": bytes, "all_reduce": bytes, "calls": {...}} to $COUNT_OUT.

Used by tests/integration/test_plan_ranks.py to check tools/plan.py's per-step communication against what FSDP2
really moves. The counts are the collective buffers (all-gather output, reduce-scatter input, all-reduce tensor), as
the plan's are before its ring factor (S-1)/S.
"""

import json
import os
import sys

import torch.distributed as dist

counts = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
calls = {k: 0 for k in counts}


def _wrap(name, key, tensor_arg):
    original = getattr(dist, name)

    def wrapped(*args, **kwargs):
        t = kwargs[tensor_arg] if tensor_arg in kwargs else args[0 if tensor_arg in ("output", "tensor") else 1]
        if key != "all_reduce" or t.numel() > 1:  # the loss / stop-flag scalars are not FSDP's
            counts[key] += t.numel() * t.element_size()
            calls[key] += 1
        return original(*args, **kwargs)

    setattr(dist, name, wrapped)


_wrap("all_gather_single", "all_gather", "output")
_wrap("reduce_scatter_single", "reduce_scatter", "input")
_wrap("all_reduce", "all_reduce", "tensor")

from launch.cli import main  # noqa: E402

try:
    main(["train", *sys.argv[1:]])
finally:
    if os.environ.get("RANK", "0") == "0":
        with open(os.environ["COUNT_OUT"], "w") as f:
            json.dump({**counts, "calls": calls}, f)
