"""A newcomer's processes print real progress, not the two lines an installed torchao makes every diffusers import
log (train/quiet.py); other warnings on the same loggers still show."""

import logging
import subprocess
import sys

import pytest

import tiny_runs


def test_torchao_import_noise_is_dropped_by_a_real_entry_point(tmp_path):
    pytest.importorskip("torchao")  # without torchao there is nothing to drop
    r = subprocess.run([sys.executable, "-m", "dataset_tools", "tiny-model", str(tmp_path / "m")], cwd=tiny_runs.REPO,
                       env=tiny_runs.env(), capture_output=True, text=True, timeout=300, check=True)
    assert (tmp_path / "m" / "model_index.json").is_file()
    out = r.stdout + r.stderr
    assert "Unable to import `torchao` Tensor objects" not in out
    assert "is an Enum subclass" not in out


def test_other_messages_on_those_loggers_still_show():
    from train import quiet

    class Keep(logging.Handler):  # on the logger itself: diffusers' loggers do not propagate to the root
        def __init__(self):
            super().__init__(logging.WARNING)
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    quiet.install()
    quiet.install()  # idempotent: one filter per message
    for name, text in quiet._DROPPED.items():
        logger = logging.getLogger(name)
        assert sum(isinstance(f, quiet._DropMessage) for f in logger.filters) == 1
        keep = Keep()
        logger.addHandler(keep)
        try:
            logger.warning("something else went wrong")
            logger.warning(f"x {text} y")
        finally:
            logger.removeHandler(keep)
        assert keep.seen == ["something else went wrong"]
