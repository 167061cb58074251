"""TensorBoard scalars/images on rank 0; other ranks get a logger that does nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.run_dir import RunDir


class Logger:
    def __init__(self, run_dir: str | Path, *, enabled: bool):
        self.writer = None
        if enabled:
            # deferred on purpose: tensorboard and protobuf load only in the one process that writes events
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def image(self, tag: str, image, step: int) -> None:
        """`image`: a PIL image."""
        if self.writer:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
