"""Test helper (not product code): `dedistill train` with one fault injected at an exact place, so a test can cause a
lost worker or a hung rank deterministically (tests/system/test_reliability_dist.py).

    python -m launch.torchrun ... tests/_fault_train.py FAULT CONFIG [a.b=value ...]

FAULT is one of
- `kill:RANK:STEP`: rank RANK SIGKILLs itself inside the forward pass of step STEP (in the first transformer
  block, after FSDP has gathered its weights), in the first start only (TORCHELASTIC_RESTART_COUNT=0): the
  restarted group runs clean. Like a GPU falling off the bus in the middle of a step.
- `stall:RANK:STEP:SECONDS`: rank RANK sleeps SECONDS before its stop-flag all_reduce of step STEP (every other
  rank is already waiting in it), like a rank stuck in I/O or a driver call.

Steps count from 1 within a start (a fresh start: the run's step numbers). Each rank prints `FAULT ...` when it acts.
"""

import os
import signal
import sys
import time

import train.trainer as trainer

kind, *fields = sys.argv.pop(1).split(":")
RANK, STEP = int(fields[0]), int(fields[1])
calls = {"step": 0, "agreed": 0}


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


if kind == "kill":
    _step = trainer.forward_backward_step

    def forward_backward_step(transformer, *args, **kwargs):
        calls["step"] += 1
        if calls["step"] == STEP and _rank() == RANK and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            def die(module, inputs):
                print(f"FAULT kill rank {RANK} in the forward of step {STEP}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            transformer.transformer_blocks[0].register_forward_pre_hook(die)
        return _step(transformer, *args, **kwargs)

    trainer.forward_backward_step = forward_backward_step  # the trainer calls it through its module global
elif kind == "stall":
    SECONDS = float(fields[2])
    _agreed = trainer.StopFlag.agreed

    def agreed(self, device):
        calls["agreed"] += 1
        if calls["agreed"] == STEP and _rank() == RANK:
            print(f"FAULT stall rank {RANK} for {SECONDS:g} s before the stop-flag all_reduce of step {STEP} "
                  f"at {time.time():.3f}", flush=True)
            time.sleep(SECONDS)
        return _agreed(self, device)

    trainer.StopFlag.agreed = agreed
else:
    raise SystemExit(f"unknown fault {kind!r}")

if __name__ == "__main__":
    from launch.cli import main

    main(["train", *sys.argv[1:]])
