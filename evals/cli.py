"""`dedistill fid` (registered into launch/cli.py's parser by `register`)."""

from __future__ import annotations


def register(sub) -> None:
    from evals import fid

    fid.register(sub)
