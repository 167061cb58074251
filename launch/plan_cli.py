"""`dedistill plan CONFIG [--nodes N] [--gpus-per-node G] [--gpu-mem-gib M] [--host-mem-gib H] [a.b=v ...]`: memory,
checkpoint size, FLOPs and communication of a training config before anything is submitted (tools/plan.py)."""

from __future__ import annotations

from launch.cli import _preset
from train.config import load_config


def cmd_plan(a) -> None:
    # deferred: tools.plan imports diffusers, transformers and peft (seconds); `dedistill --help` imports this module
    from tools.plan import Cluster, format_plan, make_plan

    cfg = load_config(_preset(a.config), a.overrides)
    cluster = Cluster(nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu_mem_gib=a.gpu_mem_gib,
                      host_mem_gib=a.host_mem_gib, mfu=a.mfu, peak_tflops=a.peak_tflops, nvlink_gbs=a.nvlink_gbs,
                      ib_gbits=a.ib_gbits)
    precomputed = {"auto": None, "yes": True, "no": False}[a.precomputed]
    plan = make_plan(cfg, cluster, text_tokens=a.text_tokens, precomputed=precomputed)
    print(format_plan(plan))


def register(sub) -> None:
    s = sub.add_parser("plan", help="per-GPU memory, checkpoint size, FLOPs and comm of a config; fits or not")
    s.add_argument("config", help="YAML config path or preset name (configs/)")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU (default 80: H100/A100 80GB)")
    s.add_argument("--host-mem-gib", type=float, default=1024.0, help="host RAM per node")
    s.add_argument("--mfu", type=float, default=0.40, help="fraction of peak the compute kernels reach")
    s.add_argument("--nvlink-gbs", type=float, default=360.0,
                   help="NCCL bus bandwidth in a node, GB/s one way (8 H100s: ~360; NVLink 4 is 450 nominal)")
    s.add_argument("--ib-gbits", type=float, default=400.0, help="InfiniBand per NIC (one per GPU), Gb/s one way")
    s.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    s.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens per sample (default: objective.max_text_tokens, the worst case)")
    s.add_argument("--precomputed", choices=["auto", "yes", "no"], default="auto",
                   help="whether the data is precomputed (no encoders on the GPU); auto reads data.local")
    s.set_defaults(func=cmd_plan)
