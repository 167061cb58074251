"""`dedistill checkpoint verify RUN_DIR`: every checkpoint of a run checked offline (train/checkpoint/verify.py),
one line each; exit status 1 when the newest complete checkpoint is bad (a resume would fall back from it)."""

from __future__ import annotations


def cmd_verify(a) -> None:
    # deferred: `dedistill --help` imports every command's parser; a command's modules load only when it runs
    from train.checkpoint.verify import verify_run

    lines, newest_bad = verify_run(a.run_dir)
    for line in lines:
        print(line, flush=True)
    if newest_bad:
        raise SystemExit(1)


def register(sub) -> None:
    s = sub.add_parser("checkpoint", help="checkpoint tools: verify")
    inner = s.add_subparsers(dest="checkpoint_command", required=True, metavar="COMMAND")
    v = inner.add_parser("verify", help="check every checkpoint of a run offline (files, sizes, sha256, DCP index)")
    v.add_argument("run_dir", help="a run dir (its checkpoints/) or one checkpoint dir (step_N)")
    v.set_defaults(func=cmd_verify)
