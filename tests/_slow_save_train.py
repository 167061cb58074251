"""Test helper (not product code): `dedistill train`, except that the checkpoint of one step is slow to finish.

    python -m torch.distributed.run ... tests/_slow_save_train.py STEP CONFIG [a.b=value ...]

After `dcp.save` has written every shard and the metadata of step STEP — everything but the COMPLETE marker — each
rank prints `SHARDS_WRITTEN <dir>` and sleeps, like a save stuck on slow storage, so a test can SIGKILL the job at
the worst moment (tests/integration/test_preemption.py). With `checkpoint.async_save=true` the same happens in DCP's background
writer thread (`async_save` calls `state_dict_saver.save`), while the loop trains on (tests/integration/test_async_checkpoint.py).
"""

import sys
import time

import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict_saver as state_dict_saver

STEP = int(sys.argv.pop(1))
_save = dcp.save


def _slow_save(state, *args, checkpoint_id=None, **kwargs):
    out = _save(state, *args, checkpoint_id=checkpoint_id, **kwargs)
    if str(checkpoint_id).endswith(f"step_{STEP:08d}"):
        print(f"SHARDS_WRITTEN {checkpoint_id}", flush=True)
        time.sleep(600)
    return out


dcp.save = _slow_save  # train/checkpoint/manager.py calls dcp.save through the module attribute
state_dict_saver.save = _slow_save  # what DCP's async executor imports and calls in its thread

if __name__ == "__main__":
    from launch.cli import main

    main(["train", *sys.argv[1:]])
