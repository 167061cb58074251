"""`dedistill submit CONFIG --nodes N --gpus-per-node G [slurm options] [a.b=value ...]` (registered by launch/cli.py)."""

from __future__ import annotations


def register(sub) -> None:
    s = sub.add_parser(
        "submit",
        help="submit the training job (and, with eval.mode=job, its eval jobs) to SLURM via submitit",
        description="Submits `dedistill train CONFIG` as a SLURM job: one torchrun per node, c10d rendezvous on the "
        "first node, requeued on time limit/preemption and resumed from the newest checkpoint. Without sbatch on "
        "PATH (or with --cluster local) it runs on this machine (1 node) and waits. Job files and logs: "
        "<run_dir>/submitit/.",
    )
    s.add_argument("config", help="YAML config path or preset name (configs/)")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: no GPU request)")
    s.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: GPUs, or 1)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", dest="time_min", type=int, default=60 * 24, metavar="MINUTES", help="time limit")
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--name", default="dedistill", help="job name")
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--mem-gb", type=int, default=None)
    s.add_argument("--constraint", default=None)
    s.add_argument("--signal-grace", dest="signal_grace_s", type=int, default=300, metavar="SECONDS",
                   help="USR1 this long before the time limit: checkpoint, then requeue")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="extra sbatch option, repeatable (e.g. --sbatch exclusive --sbatch reservation=big)")
    s.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                   help="default: slurm when sbatch is on PATH, else local")
    s.add_argument("--wait", action="store_true", help="block until the job has finished (always for local)")
    s.set_defaults(func=cmd_submit)


def cmd_submit(a) -> None:
    # deferred: `dedistill --help` imports every command's parser; a command's modules load only when it runs
    from launch.submit import SubmitOptions, submit_training, wait_for

    opts = SubmitOptions(
        nodes=a.nodes, gpus_per_node=a.gpus_per_node, nproc_per_node=a.nproc_per_node, partition=a.partition,
        time_min=a.time_min, account=a.account, qos=a.qos, name=a.name, cpus_per_task=a.cpus_per_task,
        mem_gb=a.mem_gb, constraint=a.constraint, signal_grace_s=a.signal_grace_s, sbatch=a.sbatch, cluster=a.cluster,
    )
    job, cfg, cluster = submit_training(a.config, a.overrides, opts)
    print(f"[dedistill submit] {cluster} job {job.job_id}: {opts.nodes} node(s) x {opts.procs_per_node} process(es)")
    print(f"  run dir : {cfg.run_dir}")
    print(f"  logs    : {job.paths.stdout.parent}")
    if cfg.eval.every_steps > 0 and cfg.eval.suite and cfg.eval.mode == "job":
        print(f"  evals   : one job per {cfg.eval.every_steps} steps, submitted by the training job")
    if a.wait or cluster != "slurm":
        result = wait_for(job)
        print(f"[dedistill submit] job {job.job_id} done: {result}")
