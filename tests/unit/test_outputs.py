"""train/outputs.py: atomic writes leave the old file or the whole new one, and `fsync=True` syncs the file before
it is renamed into place and its directory after."""

import os
import stat

import pytest

from train.outputs import atomic_write, write_text_atomic


def test_fsync_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    target = tmp_path / "COMPLETE"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        p = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((p, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(target, "{}", fsync=True)
    assert target.read_text() == "{}"
    assert len(synced) == 2
    (tmp_file, published_then), (directory, published_after) = synced
    assert os.path.dirname(tmp_file) == str(tmp_path) and tmp_file != str(target) and not published_then
    assert directory == str(tmp_path) and published_after
    synced.clear()
    write_text_atomic(target, "{}")
    assert synced == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "job.yaml"
    target.write_text("old")

    def half(tmp):
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half, fsync=True)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_the_new_file_has_the_mode_a_plain_write_gets(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    write_text_atomic(tmp_path / "atomic", "x", fsync=True)
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
