"""Docs as tests: every shell command README.md and docs/*.md show runs here, as a user types it.

`tests/doc_commands.py` collects the commands (its docstring says what counts as one). Each has one entry in CASES,
keyed by its text exactly as the docs show it:

- `run(...)`: run it in a scratch checkout (symlinks to this repo's top-level files, so `configs/...`,
  `slurm/...` and relative outputs such as `runs/x` or `cat.png` resolve there): with bash, or, when it is one plain
  `dedistill` command of IN_PROCESS, through launch.cli.main in the test process (what the console script calls,
  without a new Python importing torch and diffusers for each of some thirty commands), with the documented flags and
  defaults. Only paths change, by the PATHS table (and a case's own `paths`): a doc path becomes a session fixture
  (the tiny pipeline, tiny data, the photo folder, a tiny run), and every `--out X` becomes `<tmp>/out/X`. An
  optional `[...]` group of a synopsis is left out (the user who types the synopsis gets the defaults). Anything
  else that differs from the docs, e.g. the step count of a 12B GPU preset run on CPU, is a visible `append` or
  `replace` with its `why`. The command must exit 0 without a traceback, and what its `--out` names must exist.
- `run(slurm=True, ...)`: the same against the suite's local SLURM cluster (tests/slurm_cluster.py); the jobs the
  command submits must end COMPLETED.
- `skip(why)`: not run, with the reason (network downloads, shell set-up lines, GPU-only sizes, recursion).
- `covered(test, why)`: not run here because the named test already runs the same command (or the same script in
  the same mode) and checks more of its output; `test_covering_tests_exist` fails when that test is gone.
- `same_as(command, why)`: not run here because another documented command, run here, does everything this one does
  (the same job with more options, or this line as its prelude); `test_same_as_names_a_command_that_runs` fails when
  that command is no longer a `run` case.

`test_every_documented_command_is_mapped` fails when the docs show a command CASES does not know (add one line) or
when CASES holds a command the docs no longer show (delete it), so the docs cannot drift from the tested surface.

A command with a known defect is `xfail(strict=True)` with the defect named (`xfail=`), so its fix flips the case.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from doc_commands import collect
from tiny_runs import environment_kept

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    why: str = ""
    """Why the command differs from the docs beyond paths (required with `replace`/`append`)."""
    replace: tuple[tuple[str, str], ...] = ()
    append: str = ""
    paths: tuple[tuple[str, str], ...] = ()
    """Path rewrites for this command only; they win over PATHS."""
    slurm: bool = False
    slow: bool = False
    xfail: str = ""
    creates: tuple[str, ...] = ()
    """Templates (like PATHS values; relative ones in the scratch checkout; globs allowed) that must exist afterwards,
    beyond the `--out` target."""
    absent: tuple[str, ...] = ()
    """Paths that must not exist afterwards."""
    expect: str = ""
    """A regex the combined output must match."""
    timeout: int = 600


@dataclass(frozen=True)
class Skip:
    why: str


def run(**kw) -> Run:
    case = Run(**{k: (tuple(v.items()) if k == "paths" else v) for k, v in kw.items()})
    assert bool(case.why) == bool(case.replace or case.append), "`why` goes with `replace`/`append`, and only there"
    return case


def skip(why: str) -> Skip:
    return Skip(why)


@dataclass(frozen=True)
class Covered:
    test: str
    """`tests/<tier>/test_x.py::test_name`, the test that runs this command."""
    why: str


def covered(test: str, why: str) -> Covered:
    return Covered(test, why)


@dataclass(frozen=True)
class SameAs:
    command: str
    """The CASES key of the documented command that runs instead (a `run` case)."""
    why: str


def same_as(command: str, why: str) -> SameAs:
    return SameAs(command, why)


# ---------------------------------------------------------------------------------------------------- path mapping

# Doc path -> what it becomes. `{name}` is a session fixture (FIXTURES), `{tmp}` the test's own tmp dir.
PATHS = {
    # models
    "/models/FLUX.1-schnell": "{model}",
    "/shared/models/FLUX.1-schnell": "{model}",
    "model.path=...": "model.path={model}",
    "FLUX_DIR": "{model}",
    "FLUX": "{model}",
    "demo/model": "{model}",
    "demo/chroma-model": "{chroma_model}",
    "/models/fid/pt_inception-2015-12-05.safetensors": "{model}/eval/inception.safetensors",
    # data
    "/data/mds": "{mds}",
    "data.local=...": "data.local={mds}",
    "data.remote=...": "data.remote={mds}",
    "demo/data": "{mds}",
    "/shared/data/raw": "{photos}",
    "SRC": "{photos}",
    "DATA": "{photo_mds}",
    "DATA_B": "{photo_b}",
    "DATA_P": "{photo_p}",
    "generated/": "{photos}",
    "/data/coco-val-images/": "{photo_mds}",
    "/shared/mds": "{tmp}/out/shared/mds",  # what the convert array job just wrote
    "/local/nvme/mds-cache": "{tmp}/mds-cache",
    # configs
    "CONFIG.yaml": "configs/tiny-cpu.yaml",
    # runs
    "runs/libreflux": "{run}",
    "demo/run": "{run}",
    "runs/libreflux/checkpoints/step_00016000": "{run}/checkpoints/step_00000002",
    "/shared/runs/x/checkpoints/step_00016000": "{run}/checkpoints/step_00000002",
    "/shared/runs/lora": "{run_lora}",
    "/shared/runs/libreflux-8n": "{tmp}/shared/runs/libreflux-8n",
}

FIXTURES = {
    "model": "tiny_model_dir",
    "chroma_model": "tiny_chroma_dir",
    "mds": "tiny_data_dir",
    "photos": "photo_dir",  # real photographs in every odd mode (tests/conftest.py)
    "photo_mds": "doc_photo_mds",
    "photo_b": "doc_photo_bucketed",
    "photo_p": "doc_photo_precomputed",
    "run": "doc_run",
    "run_lora": "tiny_lora_run",  # conftest's 4-step LoRA run, which tests/integration/test_export.py exports too
    "lycoris": "doc_lycoris_file",
}

# The 12B presets, run on the tiny pipeline on CPU: a few steps at 64 px and an end-of-run grid that costs seconds.
GPU_PRESET_ON_CPU = ("train.max_steps=2 data.resolution=64 data.num_workers=0 sample.resolution=64 sample.steps=2 "
                     "checkpoint.every_steps=2 eval.every_steps=0")
WHY_GPU_PRESET = ("a 12B GPU preset, run on the tiny pipeline on CPU: 2 steps at 64 px, a 2-step grid, no loader "
                  "workers, and no periodic eval job (its suite needs CLIP-L at /models/clip-vit-large-patch14, which "
                  "evals.md downloads; the eval commands below run suites on the tiny CLIP)")
# libreflux.yaml trains on ~1.33 MP aspect buckets (data.buckets=true): its data is the bucketed photo set (R=256).
LIBREFLUX_ON_CPU = GPU_PRESET_ON_CPU.replace("data.resolution=64", "data.resolution=256")
WHY_LIBREFLUX = WHY_GPU_PRESET.replace("at 64 px", "on the photos bucketed at R=256 (the preset trains on buckets)")
# The coco suite's own paths (COCO val, pytorch-fid Inception, CLIP-L) and sizes, pointed at the tiny ones.
COCO_ON_TINY = ("eval coco prompts.mds={photo_mds} fid.reference={photo_mds} "
                "fid.inception_weights={model}/eval/inception.safetensors clip.model={model}/eval/clip "
                "num_samples=2 fid.reference_count=8 fid.dims=64 sampling.steps=[2] sampling.resolution=64 "
                "sampling.extra=[] grid_images=2")
WHY_COCO = ("the coco suite names COCO val, pytorch-fid's Inception and CLIP-L by absolute path and samples 10k images "
            "at 512 px: its path keys go to the tiny ones, and 2 samples of 2 steps at 64 px")
COCO = (("eval coco", COCO_ON_TINY),)
# data.md's commands at R=1024 on the tiny VAE: precomputing 20 images took 8 min on the shared 2-core box.
R256 = (("--resolution 1024", "--resolution 256"),)
TRAIN256 = (("data.resolution=1024", "data.resolution=256"),)
WHY_R256 = "R=1024 -> 256 on CPU (the tiny VAE took 8 min for 20 images at 1024)"
# convert_array.sbatch asks for 8 CPUs per task (#SBATCH), more than a local node has: it would pend forever
ARRAY_2 = (("--array=0-31", "--array=0-1 --cpus-per-task 1"),)
WHY_ARRAY = "32 slices of a 20-image folder -> 2, and 1 CPU per task (the local nodes have 2, the script asks 8)"
SLURM_8X8 = (("--nodes 8 --gpus-per-node 8", "--nodes 2"),)
WHY_SLURM = "8 GPU nodes -> the local cluster's 2 CPU nodes, one process each"
NOT_RUN_SHELL = "shell set-up on a login node (cd, clone, module load, activate); the suite runs inside that set-up"
NO_NETWORK = "downloads from the internet, which the suite has no access to (and must not need)"
GPU_FULL = "FLUX.1-schnell size (12B) needs a GPU with 80 GB; the same code runs here as `--tiny` (performance.md:12)"


# cluster.md's full 8-node LibreFLUX job; the README's shorter sbatch line is the same job with fewer options.
SBATCH_LIBREFLUX_8N = (
    "sbatch --nodes 8 --gpus-per-node 8 --cpus-per-task 64 --time 24:00:00 --partition gpu --job-name libreflux "
    "slurm/train.sbatch configs/libreflux.yaml model.path=/shared/models/FLUX.1-schnell data.remote=/shared/mds "
    "data.local=/local/nvme/mds-cache run_dir=/shared/runs/libreflux-8n parallel.hsdp=true train.batch_size=1 "
    "eval.mode=job")
ARRAY_CONVERT_32 = ("jid=$(sbatch --parsable --array=0-31 slurm/convert_array.sbatch --source /shared/data/raw "
                    "--out /shared/mds)")


# ------------------------------------------------------------------------------------------------------------ cases

CASES: dict[str, Run | Skip | Covered | SameAs] = {
    # README.md
    "make demo": run(replace=(("make demo", "make demo STAMP= BIN={bin} DEMO_DIR={tmp}/out/demo "
                                            "DEMO_ARGS='--n-samples 64 --n-prompts 8 train.max_steps=4'"),),
                     why="`make demo` minus the venv install (the suite already runs in it), 4 of its 300 training "
                         "steps, 64 training samples and 8 eval prompts per cell: the suite's one demo run",
                     creates=("{tmp}/out/demo/run/checkpoints/step_00000004/COMPLETE", "{tmp}/out/demo/demo_results.json",
                              "{tmp}/out/demo/before_after.png", "{tmp}/out/demo/cfg_curve.png"),
                     expect=r"de-distilled \(28 steps\): adherence cfg 1 -> 5", slow=True),
    "python tests/doc_commands.py": run(expect=r"README.md:\d+.* make demo"),
    "make test": skip("runs the whole suite, this file included: it would recurse (.ci/run runs it)"),
    "make test XDIST=": skip("the whole suite in one process, this file included: it would recurse"),
    # docs/testing.md
    "make test-fast": skip("runs tests/unit, which the suite this file belongs to runs as well"),
    "dedistill train configs/lora-1gpu.yaml model.path=/models/FLUX.1-schnell data.local=/data/mds":
        run(append=GPU_PRESET_ON_CPU, why=WHY_GPU_PRESET, creates=("runs/lora-1gpu/checkpoints/step_00000002/COMPLETE",)),
    "torchrun --nproc_per_node 8 -m train configs/libreflux.yaml model.path=... data.local=...":
        run(replace=(("--nproc_per_node 8", "--nproc_per_node 2"),), append=LIBREFLUX_ON_CPU,
            why="8 GPUs -> 2 CPU processes; " + WHY_LIBREFLUX, slow=True,
            paths={"data.local=...": "data.local={photo_b}"},
            creates=("runs/libreflux/checkpoints/step_00000002/COMPLETE",)),
    'dedistill sample --model runs/libreflux --prompt "a cat" --cfg 3.5 --steps 28 --out cat.png': run(),
    "sbatch --nodes 8 --gpus-per-node 8 slurm/train.sbatch configs/libreflux.yaml model.path=... data.remote=... "
    "data.local=...":
        same_as(SBATCH_LIBREFLUX_8N, "cluster.md's sbatch line submits this job (slurm/train.sbatch, libreflux.yaml, "
                "data.remote streamed into a data.local cache) with more options: HSDP, a run_dir, a partition"),
    "dedistill export --checkpoint runs/libreflux --out exports/libreflux --format diffusers":
        run(creates=("{tmp}/out/exports/libreflux/transformer",)),
    "dedistill plan configs/libreflux.yaml --nodes 8 --gpus-per-node 8": run(expect=r"verdict: fits"),
    "dedistill export --checkpoint runs/libreflux --out exports/libreflux-lycoris --format lycoris":
        run(creates=("{tmp}/out/exports/libreflux-lycoris/lycoris_lokr.safetensors",)),
    "dedistill describe libreflux": run(expect=r"effective scale 1 "),
    "dedistill export --checkpoint runs/libreflux --out exports/libreflux-bfl --format bfl":
        run(creates=("{tmp}/out/exports/libreflux-bfl/flux1-dedistill.safetensors",)),
    "dedistill export --format": skip("a fragment: names the option the export lines around it use"),
    # docs/architecture.md: none.  docs/cluster.md
    "dedistill submit configs/tiny-cpu.yaml --cluster local --nproc-per-node 2 model.path=tiny/model "
    "data.local=tiny/data":
        covered("tests/system/test_slurm.py::test_submit_without_slurm_ran_the_reference_locally",
                "the suite's reference run (conftest.py) is this command on the tiny pipeline, 6 steps"),
    "dedistill plan configs/openflux.yaml --gpus-per-node 1": run(expect=r"does not fit: .*GPUs"),
    "dedistill plan configs/flux2-dev-undistill.yaml --nodes 2 --gpus-per-node 8":
        run(expect=r"32\.184B[\s\S]*Mistral3ForConditionalGeneration, 19\.010B parameters loaded[\s\S]*verdict: does not fit: .*precompute"),
    "dedistill plan configs/flux2-dev-undistill.yaml model.text_encoder_placement=fsdp --nodes 2 --gpus-per-node 8 "
    "--precomputed no": run(expect=r"frozen encoders \(text model, CLIP, VAE\) +2\.37 GiB[\s\S]*verdict: fits"),
    "dedistill plan configs/flux2-dev-undistill.yaml --nodes 2 --gpus-per-node 8 --precomputed yes":
        run(expect=r"32\.184B[\s\S]*verdict: fits"),
    "dedistill plan configs/flux2-klein-base-lora.yaml --gpus-per-node 1": run(expect=r"verdict: fits"),
    "dedistill plan configs/libreflux.yaml parallel.hsdp=true --nodes 8 --gpus-per-node 8": run(expect=r"verdict"),
    "dedistill plan configs/lora-1gpu.yaml train.batch_size=1 --gpus-per-node 1 --gpu-mem-gib 24": run(expect=r"verdict"),
    "dedistill plan lora-24gb --gpus-per-node 1 --gpu-mem-gib 24": run(expect=r"int8 \(replicated\)[\s\S]*verdict: fits"),
    "python bench/base_quant.py": skip("builds two FLUX-width blocks (0.5B parameters) and runs bf16 CPU matmuls for "
                                       "minutes; tests/unit/test_quant.py runs the same quantize/forward/backward path on "
                                       "the tiny model"),
    "python bench/plan_vs_measured.py": skip("about 15 min of mid-size CPU steps; tests/unit/test_plan.py checks each term "
                                             "against the trainer's state and autograd's saved tensors"),
    "sbatch --nodes 2 --gpus-per-node 8 slurm/train.sbatch configs/full-fsdp-multinode.yaml parallel.max_restarts=2 "
    "parallel.timeout_s=600": skip("needs a SLURM cluster with GPUs; tests/system/test_reliability_dist.py runs the same "
                                   "launch.torchrun restart and timeout paths on 2 gloo ranks"),
    "sbatch slurm/train.sbatch": skip("a fragment in prose: the script the sbatch lines here submit"),
    "dedistill export --checkpoint /shared/runs/lora --out /shared/exports/x-lora-kohya --format lora --lora-layout "
    "kohya": covered("tests/integration/test_export_single_file.py::test_cli_kohya_lora_loads_in_diffusers_like_the_peft_lora",
                     "runs this export on a LoRA run and loads the file with diffusers' load_lora_weights"),
    "dedistill export --checkpoint /shared/runs/x --out /shared/exports/x-bfl --format bfl":
        covered("tests/integration/test_export_single_file.py::test_cli_bfl_file_is_the_diffusers_export_in_bfl_keys",
                "runs this export on a run dir and checks every key against the diffusers export (README.md's bfl "
                "line runs too)"),
    "python bench/masked_vs_stock.py --out /tmp/masked_vs_stock":
        skip("about 10 min (a 100-step run, then both pipelines); tests/integration/test_export_pipeline.py makes the same "
             "comparison on an 8-step run"),
    "dedistill export --checkpoint /shared/runs/libreflux-8n --out /shared/exports/libreflux-lycoris --format lycoris":
        covered("tests/integration/test_lycoris_format_cli.py::test_lycoris_export_loads_with_create_lycoris_from_weights",
                "runs this export on a LoKr run and loads it with LyCORIS (README.md's lycoris line runs too)"),

    "dedistill submit configs/libreflux.yaml --nodes 8 --gpus-per-node 8 model.path=... data.remote=... "
    "data.local=...":
        covered("tests/system/test_slurm.py::test_dedistill_submit_preempted_resumes_bitwise",
                "runs `dedistill submit CONFIG --nodes 2 a.b=...` on the local SLURM cluster (submitit -> launch.torchrun "
                "on both nodes), then preempts and resumes it bitwise; libreflux.yaml itself runs on that cluster in "
                "cluster.md's sbatch line"),
    "cd /shared/$USER": skip(NOT_RUN_SHELL),
    "git clone <repo> dedistill && cd dedistill": skip(NOT_RUN_SHELL),
    "module load python/3.11 cuda/12.4": skip(NOT_RUN_SHELL),
    "make install": skip("creates .venv and installs ~7 GB of pinned packages: the environment this suite runs in"),
    ". .venv/bin/activate": skip(NOT_RUN_SHELL),
    "dedistill --help": run(expect=r"usage: dedistill"),
    ARRAY_CONVERT_32:
        same_as('sbatch --dependency=afterok:$jid --wrap "dedistill data merge /shared/mds"',
                "the merge line runs this array job as its prelude (its $jid), and waits for every task to end "
                "COMPLETED"),
    'sbatch --dependency=afterok:$jid --wrap "dedistill data merge /shared/mds"':
        run(slurm=True, replace=ARRAY_2, why="(its prelude, the 32-task array line) " + WHY_ARRAY,
            creates=("{tmp}/out/shared/mds/index.json",), slow=True),
    "dedistill export --checkpoint /shared/runs/x/checkpoints/step_00016000 --out /shared/exports/x --format diffusers":
        run(creates=("{tmp}/out/shared/exports/x/model_index.json",)),
    "dedistill export --checkpoint /shared/runs/lora --out /shared/exports/x-lora --format lora":
        covered("tests/integration/test_export_single_file.py::test_cli_kohya_lora_loads_in_diffusers_like_the_peft_lora",
                "runs this export on a LoRA run and loads the file with diffusers' load_lora_weights"),
    "cp -r /datasets/FLUX.1-schnell /shared/models/": skip("copies the user's own model download; nothing to copy here"),
    "jid=$(sbatch --parsable --array=0-63 slurm/convert_array.sbatch --source /shared/data/raw --out /shared/mds)":
        skip("the same as the 32-task array line (run as the merge line's prelude) with 64 slices instead of 32"),
    SBATCH_LIBREFLUX_8N:
        run(slurm=True, replace=(("--nodes 8 --gpus-per-node 8 --cpus-per-task 64", "--nodes 2 --cpus-per-task 1"),
                                 ("--partition gpu", "--partition debug")),
            append=LIBREFLUX_ON_CPU, paths={"/shared/mds": "{photo_b}"}, slow=True,
            why="8 nodes x 8 GPUs x 64 CPUs -> the local cluster's 2 nodes x 1 CPU, its partition `debug`; "
                + WHY_LIBREFLUX,
            creates=("{tmp}/shared/runs/libreflux-8n/checkpoints/step_00000002/COMPLETE",)),
    "dedistill export --checkpoint /shared/runs/libreflux-8n --out /shared/exports/libreflux --format diffusers":
        covered("tests/integration/test_photos.py::test_photos_through_the_cli_with_its_defaults",
                "exports a run dir with this command's defaults and checks the bf16 weights and the pipeline index "
                "(README.md's diffusers line runs too)"),
    "python tests/slurm_cluster.py start": skip("the `slurm_cluster` fixture runs this (LocalSlurmCluster.start/stop)"),
    "export SLURM_CONF=...": skip("sets the value `python tests/slurm_cluster.py start` printed"),
    "python tests/slurm_cluster.py stop BASE": skip("the `slurm_cluster` fixture runs this (LocalSlurmCluster.stop)"),
    "dedistill train CONFIG.yaml [a.b=value ...]": skip("synopsis; its concrete forms are the train commands here"),
    "srun --ntasks-per-node=1": skip("a fragment of slurm/train.sbatch's srun line, run by the sbatch commands here"),
    "python -m launch.torchrun": skip("names the module slurm/train.sbatch runs (the sbatch commands here run it)"),
    "sbatch --gpus-per-node 1 slurm/eval.sbatch SUITE.yaml --checkpoint /shared/runs/x/checkpoints/step_00010000":
        run(slurm=True, replace=(("--gpus-per-node 1 ", ""), ("SUITE.yaml", "configs/evals/tiny.yaml")),
            paths={"/shared/runs/x/checkpoints/step_00010000": "{run}/checkpoints/step_00000002"},
            why="no GPUs on the local cluster; SUITE.yaml is a placeholder for a suite: the tiny one", slow=True,
            creates=("{run}/evals/step_00000002/tiny/metrics.json",)),
    "dedistill sample --model DIR": skip("a fragment: says an exported dir loads in `dedistill sample`"),
    "tensorboard --logdir /shared/runs/libreflux-8n/tb": skip("starts a web server that runs until stopped"),
    "dedistill submit configs/libreflux.yaml --nodes 8 --gpus-per-node 8 --cpus-per-task 64 --time 1440 --partition "
    "gpu --name libreflux model.path=... data.remote=... run_dir=... parallel.hsdp=true":
        skip("the submitit form of cluster.md:167 (run there with sbatch); cluster.md:8 runs `dedistill submit`"),
    # docs/data.md
    "dedistill data convert --source SRC --out DATA [--workers N] [--min-size 64] [--check fast|full]":
        run(paths={"SRC": "{photos}"}, creates=("{tmp}/out/DATA/index.json",)),
    "dedistill data bucket --src DATA --out DATA_B --resolution 1024 [--bucket-step 64] [--max-aspect 2.5]":
        run(replace=R256, why=WHY_R256, creates=("{tmp}/out/DATA_B/buckets.json",)),
    "dedistill train CONFIG.yaml data.local=DATA_B data.resolution=1024 data.buckets=true":
        run(replace=TRAIN256, append="train.max_steps=2 model.path={model}",
            why=WHY_R256 + "; the tiny-cpu preset needs model.path; 2 of 200 steps",
            slow=True, creates=("runs/tiny-cpu/checkpoints/step_00000002/COMPLETE",)),
    "dedistill data precompute --model FLUX_DIR --src DATA --out DATA_P --resolution 1024 [--square] "
    "[--latents dist|mean] [--dtype auto|bf16|fp16|fp32] [--max-text-tokens 512] [--batch-size 16]":
        run(replace=R256, why=WHY_R256, creates=("{tmp}/out/DATA_P/buckets.json",), slow=True),
    "dedistill train CONFIG.yaml data.local=DATA_P data.resolution=1024 data.buckets=true":
        run(replace=TRAIN256, append="train.max_steps=2 model.path={model} objective.max_text_tokens=512",
            why=WHY_R256 + "; the tiny-cpu preset needs model.path, and precompute's default --max-text-tokens 512 "
                "(tiny-cpu trains 64); 2 steps",
            slow=True, creates=("runs/tiny-cpu/checkpoints/step_00000002/COMPLETE",)),
    "for g in 0 1 2 3 4 5 6 7; do CUDA_VISIBLE_DEVICES=$g dedistill data precompute --model FLUX --src DATA --out "
    "DATA_P --resolution 1024 --shard-index $g --num-shards 8 --no-progress & done; wait":
        run(replace=(("0 1 2 3 4 5 6 7", "0 1"), ("--num-shards 8", "--num-shards 2"), *R256),
            why="8 GPUs -> 2 CPU processes; " + WHY_R256, slow=True, creates=("{tmp}/out/DATA_P/buckets.json",)),
    "dedistill data inspect DATA [--max-samples 100000] [--plot out.png] [--json]": run(expect=r"samples"),
    "dedistill tiny-data OUT --format folder": run(paths={"OUT": "{tmp}/out/folder"},
                                                   creates=("{tmp}/out/folder/000000.txt",)),
    "dedistill data merge DATA": run(),
    "python -m dataset_tools.buckets 1024": run(expect=r"1024x1024"),
    "dedistill data merge DATA_P": run(),
    "python bench/data_throughput.py": covered("tests/integration/test_bench_data.py::test_data_throughput_bench_tiny",
                                               "the full bench converts 1200 1024x768 JPEGs (minutes); that test runs "
                                               "it with --tiny, the same code, and checks its tables"),
    # docs/evals.md
    "dedistill eval coco --checkpoint runs/libreflux/checkpoints/step_00016000":
        run(replace=COCO, why=WHY_COCO, creates=("{run}/evals/step_00000002",)),
    "dedistill eval coco --checkpoint /models/FLUX.1-schnell --checkpoint runs/libreflux --out reports/coco":
        run(replace=COCO, why=WHY_COCO, creates=("{tmp}/out/reports/coco/report.md",), slow=True),
    "dedistill eval coco num_samples=2000 sampling.cfg_scales='[1, 3.5]' --checkpoint runs/libreflux --out "
    "reports/quick":
        run(replace=COCO + (("num_samples=2000", "num_samples=2"),), why=WHY_COCO,
            creates=("{tmp}/out/reports/quick/report.md",)),
    "torchrun --nproc_per_node 8 -m evals eval coco --checkpoint runs/libreflux --out reports/coco":
        run(replace=COCO + (("--nproc_per_node 8", "--nproc_per_node 2"),), why="8 GPUs -> 2 processes; " + WHY_COCO,
            creates=("{tmp}/out/reports/coco/report.md",), slow=True),
    "dedistill fid generated/ /data/coco-val-images/ --weights /models/fid/pt_inception-2015-12-05.safetensors":
        # generated/ and the reference hold the same images (a folder and its conversion): FID ~ 0, which round-off
        # may put a hair below zero, as in pytorch-fid
        run(expect=r"FID:\s+-?(\d(\.\d+)?e-\d\d|0\.000)"),
    "curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth":
        skip(NO_NETWORK),
    "sha256sum pt_inception-2015-12-05-6726825d.pth": skip("checks the file the curl line downloads"),
    "python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('pt_inception-2015-12-05-"
    "6726825d.pth', map_location='cpu', weights_only=True); save_file({k: v.contiguous() for k, v in sd.items()}, "
    "'pt_inception-2015-12-05.safetensors')\"": run(creates=("pt_inception-2015-12-05.safetensors",)),
    'huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14 --include '
    '"*.json" "*.txt" "model.safetensors"': skip(NO_NETWORK),
    # docs/performance.md
    "python bench/train_step.py --tiny": covered(
        "tests/integration/test_bench_train_step_cli.py::test_tiny_bench_prints_a_consistent_table",
        "runs this --tiny bench (at one resolution) and checks every row of its table"),
    "python bench/train_step.py --size full": skip(GPU_FULL),
    "python bench/train_step.py --size full --modes lora,baseline --resolutions 512 --compile": skip(GPU_FULL),
    "python bench/train_step.py --size full --modes lora,lokr --resolutions 1024 --ac ops --compile": skip(GPU_FULL),
    "python bench/train_step.py --size full --modes lora --resolutions 512 --sync-debug": skip(GPU_FULL),
    "python -m pytest -m gpu tests/integration/test_bench_train_step_cli.py tests/unit/test_optim.py":
        skip("needs a CUDA device (without one it only skips)"),
    "pytest -m gpu": skip("needs a CUDA device (without one it only skips)"),
    "python bench/train_step.py --size full --modes lora --resolutions 512 --optim-impl single_tensor": skip(GPU_FULL),
    "bash bench/gpu_wheels.sh": skip("downloads the GPU machine's Python 3.12 wheels (~9 MB) from the package index; "
                                     "the --dry rehearsal below runs the session script without them"),
    "python bench/gpu_session.py --list": covered("tests/integration/test_gpu_session.py::test_list_mode_prints_every_command",
                                                  "the same command; it checks one line per planned step"),
    "GPU_WHEELS=none bash bench/gpu_session.sh --dry --only bench-512-sync-debug --out /tmp/gpu_dry":
        covered("tests/integration/test_gpu_session.py::test_dry_run_writes_the_results_table",
                "the same script in the same --dry mode, every step (bench-512-sync-debug among them must end ok), "
                "and it checks the results table"),
    "python bench/ot_pairing.py --tiny": covered("tests/integration/test_recipe_knobs_bench.py::test_ot_bench_tiny_runs",
                                                 "the same command (2 repeats) and checks its rows"),
    "python bench/ot_pairing.py": skip("1-2 min of batch-64 assignments at FLUX latent sizes; --tiny above runs the "
                                       "same code"),
    "dedistill tiny-model /tmp/mid --size mid --dtype bf16":
        skip("writes a 0.64B-parameter model (1.9 GB, minutes) for the two benches below; tests/integration/test_full_width.py "
             "writes --size full-width through the same code"),
    "python bench/load_memory.py --model /tmp/mid --nproc 2":
        skip("minutes on the mid model; tests/integration/test_sharded_load.py checks the sharded load it measures"),
    "dedistill tiny-data /tmp/tdata --n 16": run(paths={"/tmp/tdata": "{tmp}/tdata"},
                                                 creates=("{tmp}/tdata/index.json",)),
    "python bench/checkpoint_stall.py --model /tmp/mid --src /tmp/tdata --work /tmp/stall":
        skip("minutes on the mid model; tests/integration/test_async_checkpoint.py checks the async save it times"),
    "python bench/length_grouping.py": run(expect=r"text pad %"),
    # docs/proof.md
    "python -m evals.experiments.proof --config configs/proof-cpu.yaml":
        skip("about 90 min on 2 cores; --smoke (proof.md:9) runs every stage of the same code"),
    "python -m evals.experiments.proof --config configs/proof-gpu.yaml": skip("sized for one GPU (never run on CPU)"),
    "python -m evals.experiments.proof --config configs/proof-dev-cpu.yaml":
        skip("about 45 min on 2 cores from the toy-schnell build; test_proof_smoke.py::"
             "test_proof_dev_smoke_runs_both_objectives_on_the_toy_dev runs every stage of it"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 300 "
    "out_dir=runs/abl-text teacher.steps=1500":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "the same driver at the proof's --smoke sizes (about 25 min at these); it checks every checkpoint's rows"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning onehot --every 300 "
    "out_dir=runs/abl-onehot teacher.steps=1500":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "the same driver at the proof's --smoke sizes (about 20 min at these); it checks every checkpoint's rows"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning words --every 500 "
    "out_dir=runs/abl-words teacher.steps=1500 model.num_attention_heads=8":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "the same driver with word tokens at the proof's --smoke sizes (about 10 min at these)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning words-roles --every 500 "
    "out_dir=runs/abl-words-roles teacher.steps=1500 model.num_attention_heads=8":
        covered("tests/unit/test_ablate.py::test_word_tokens_are_one_per_word_and_bind_nothing_but_the_role_flag",
                "the words run with the background's colour word flagged; that test checks the flag is the only "
                "difference, the driver test runs the words path (about 10 min at these sizes)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 500 "
    "out_dir=runs/abl-text-split1 teacher.steps=1500 model.num_attention_heads=8 world.palettes=split "
    "'world.objects=[1]'":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its text case is this run in this world at the proof's --smoke sizes (about 25 min at these); it "
                "checks the world's shards and the stages that record the world"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning t5-only --every 750 "
    "out_dir=runs/abl-t5-split1 teacher.steps=1500 model.num_attention_heads=8 world.palettes=split "
    "'world.objects=[1]'":
        covered("tests/unit/test_ablate.py::test_text_part_dataset_is_the_encoders_output_less_one_part",
                "that test checks the t5-only dataset against the encoders, test_text_part_sampling_reads_only_its_part "
                "its sampling, and the driver test runs the pooled-only path end to end at --smoke sizes (this run "
                "is about 25 min)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning pooled-only --every 750 "
    "out_dir=runs/abl-pooled-split1 teacher.steps=1500 model.num_attention_heads=8 world.palettes=split "
    "'world.objects=[1]'":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its pooled-only case is this run at the proof's --smoke sizes (about 25 min at these)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 750 "
    "out_dir=runs/abl-nodrop-split1 teacher.steps=1500 model.num_attention_heads=8 world.palettes=split "
    "'world.objects=[1]' teacher.caption_dropout=0":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its text case is this run in this world at the proof's --smoke sizes, with the preset's caption "
                "dropout (a teacher.* override like teacher.steps=2 there; about 25 min at these sizes)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 1500 "
    "out_dir=runs/t-lr2":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its text case is this run at the proof's --smoke sizes (about 20 min on one core at these); the "
                "shipped toy schnell's teacher"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text-mean --every 1500 "
    "out_dir=runs/tm-split1":
        covered("tests/unit/test_ablate.py::test_text_part_dataset_is_the_encoders_output_less_one_part",
                "that test checks the text-mean dataset (both encoders' output, the posterior mean) against the "
                "encoders; its sampling is the text run's, which the driver test runs (this run is about 15 min)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning onehot --every 1500 "
    "out_dir=runs/oh-split1":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its onehot case is this run at the proof's --smoke sizes (about 16 min on one core at these); "
                "test_driver_resumes_a_teacher_stopped_before_its_steps runs the resume this run made"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning words --every 1500 "
    "out_dir=runs/w-split1":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its words case is this run at the proof's --smoke sizes (about 15 min on one core at these)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning words-nopool --every 1500 "
    "out_dir=runs/wn-split1":
        covered("tests/unit/test_ablate.py::test_words_nopool_is_the_word_tokens_with_a_zero_pooled_vector",
                "that test checks its tokens are the words run's and its pooled vector zero; the driver test runs "
                "the words path end to end (this run is about 15 min on one core)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 1500 "
    "out_dir=runs/t128n3 text.width=128 text.clip_width=128 text.mixing=false text.state_norm=3":
        covered("tests/unit/test_ablate.py::test_driver_trains_and_reads_every_checkpoint",
                "its text case is this run at the proof's --smoke sizes with text.width, text.clip_width, "
                "text.mixing=false and text.state_norm set (about 20 min on one core at these)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 1500 "
    "out_dir=runs/t256o text.width=256 text.mixing=false text.orthogonal=true":
        covered("tests/unit/test_tiny_model.py::test_toy_text_option_gives_each_word_its_own_state_through_diffusers",
                "that test builds these encoders (orthogonal, unmixed, 256 wide) and samples through FluxPipeline; "
                "the driver test runs the text ablation with text.* set (this run is about 20 min on one core)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 1500 "
    "out_dir=runs/t256oc text.width=256 text.mixing=false text.orthogonal=true text.clip_mixing=false":
        covered("tests/unit/test_tiny_model.py::test_toy_text_option_gives_each_word_its_own_state_through_diffusers",
                "that test builds these encoders (CLIP without mixing too) and samples through FluxPipeline; the "
                "driver test runs the text ablation with text.* set (this run is about 20 min on one core)"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --conditioning text --every 1500 "
    "out_dir=runs/t256oc6k text.width=256 text.mixing=false text.orthogonal=true text.clip_mixing=false "
    "teacher.steps=6000":
        covered("tests/unit/test_tiny_model.py::test_toy_text_option_gives_each_word_its_own_state_through_diffusers",
                "the t256oc run with a 6000-step teacher (about 25 min on one core); the driver test runs the text "
                "ablation with text.* and teacher.steps set"),
    "python -m evals.experiments.ablate --config configs/proof-cpu.yaml --roles MODEL out_dir=...":
        covered("tests/unit/test_ablate.py::test_colour_roles_counts_each_role_against_the_prompt",
                "MODEL and out_dir are placeholders; that test runs colour_roles on the smoke world and recounts it"),
    "python -m evals.experiments.proof --config configs/proof-cpu.yaml --smoke":
        covered("tests/system/test_proof_smoke.py::test_proof_smoke_produces_the_table",
                "runs this config's --smoke stages (in process) and checks every row of its table and each stage"),
    "python -m evals.experiments.proof --config configs/proof-cpu.yaml out_dir=runs/proof-F "
    "'dedistill_adapters=[full,lokr]'":
        skip("run F: the full CPU proof from the toy-schnell build's stages, about 60 min on 2 cores; the --smoke "
             "case runs every stage of it (LoKr's de-distillation as the trainer's own LoKr tests do)"),
    "python -m evals.experiments.proof --config configs/proof-cpu.yaml teacher.steps=3000 out_dir=runs/x":
        skip("the full CPU proof with overrides: ~90 min, like proof.md:7"),
    # docs/quickstart.md
    "dedistill train configs/tiny-cpu.yaml model.path=demo/model data.local=demo/data train.max_steps=10 "
    "optim.lr=3e-4": run(creates=("runs/tiny-cpu/checkpoints/step_00000010/COMPLETE",), slow=True),
    'dedistill sample --model demo/run --prompt "a large red circle in the center" --cfg 4 --steps 8 --resolution 64 '
    "--max-text-tokens 64 --out red.png": run(),
    "dedistill demo --out demo": skip("what `make demo` runs; the `make demo` case (README.md) runs it, reduced: one "
                                      "demo run per suite"),
    "python -m evals.experiments.toy_schnell --smoke out_dir=runs/ts --out runs/ts-asset":
        run(creates=("{tmp}/out/runs/ts-asset/judge.safetensors", "{tmp}/out/runs/ts-asset/pipeline/vae/config.json",
                     "{tmp}/out/runs/ts-asset/toy_schnell.json"), expect=r"\[toy-schnell\] .*ts-asset: [\d.]+ MB", slow=True),
    "python -m evals.experiments.toy_schnell": skip("rebuilds the shipped toy schnell (~50 min on 2 idle cores); "
                                                    "`--smoke` (proof.md) runs every stage of it"),
    "python -m evals.experiments.proof --config configs/toy-schnell.yaml --until vae out_dir=runs/vae-candidate "
    "vae.lr=1e-3 threads=2":
        skip("a VAE candidate at full size (22 min on 2 cores, more with the judge); the toy-schnell --smoke case "
             "runs the same stage, tests/system/test_proof_smoke.py the fg_dilate loss"),
    # docs/recipes.md (chroma.yaml)
    "dedistill prune --model /path/to/FLUX.1-schnell --out /path/to/chroma-pruned":
        skip("needs the real 12B FLUX.1-schnell; `dedistill prune` is run on the tiny FLUX by its own tests"),
    "dedistill export --format diffusers": skip("a fragment: names the format a Chroma run exports to"),
    "dedistill sample --model EXPORT": skip("a fragment: the sampler tests/integration/test_family_cli.py compares pipeline.py with"),
    # docs/reliability.md
    "python -m launch.torchrun --max-restarts=2": skip("a fragment in the lost-worker row: the command line "
                                                       "tests/system/test_reliability_dist.py runs, with its config"),
    "dedistill tiny-model demo/chroma-model --family chroma":
        run(paths={"demo/chroma-model": "demo/chroma-model"}, creates=("demo/chroma-model/transformer/config.json",)),
    "dedistill train configs/chroma.yaml model.path=demo/chroma-model data.local=demo/data run_dir=demo/chroma-run "
    "data.resolution=64 data.buckets=false train.batch_size=2 train.max_steps=2 model.dtype=fp32 data.num_workers=0 "
    "sample.resolution=64 sample.steps=2 eval.every_steps=0":
        run(paths={"demo/chroma-run": "demo/chroma-run"}, slow=True,
            creates=("demo/chroma-run/checkpoints/step_00000002/COMPLETE", "demo/chroma-run/samples/*.png")),
    "torchrun --standalone --nproc_per_node 2 -m train configs/demo.yaml model.path=demo/model data.local=demo/data "
    "run_dir=demo/run": covered("tests/unit/test_demo.py::test_demo_trains_with_the_quickstart_torchrun_command",
                                "the demo's training step, which `make demo` (README.md:10, run here for 4 steps) "
                                "runs: that test checks the demo's command is this line, flag for flag"),
    "dedistill describe configs/tiny-cpu.yaml model.path=demo/model": run(expect=r"trainable"),
    "dedistill prune --model demo/model --captions demo/data --out demo/chroma --steps 300 --lr 2e-3 "
    "--eval-resolution 64": run(creates=("{tmp}/out/demo/chroma/prune_report.json",
                                         "{tmp}/out/demo/chroma/transformer/config.json"),
                                expect=r"velocity vs FLUX on 8 held-out prompts"),
    "dedistill prune --model /models/FLUX.1-schnell --captions /data/mds --out /models/chroma-pruned":
        skip("FLUX.1 size: a GPU job (12B + 8.9B transformers); the tiny command above runs the same code"),
    "dedistill train configs/tiny-cpu.yaml model.path=demo/model data.local=demo/data run_dir=demo/chroma-knobs "
    "train.max_steps=10 objective.timestep_sampler=chroma objective.noise_pairing=ot_cosine "
    "objective.visible_padding_tokens=1": run(paths={"demo/chroma-knobs": "demo/chroma-knobs"}, slow=True,
                                              creates=("demo/chroma-knobs/checkpoints/step_00000010/COMPLETE",)),
    "dedistill export --format lycoris": skip("a fragment: names the format the export lines use"),
    "dedistill sample --model <exported dir>": skip("a fragment: says an exported dir loads in `dedistill sample`"),
    # docs/recipes.md
    "dedistill describe lora-1gpu model.adapter.rank=32": run(expect=r"trainable"),
    'dedistill describe libreflux \'model.adapter.lokr_factor_pattern={"transformer_blocks.1[0-8].ff*": 1, '
    '"transformer_blocks.1[0-8].norm1*": 1}\' \'model.adapter.target_modules=[to_q, to_k, to_v, to_out.0, add_q_proj, '
    'add_k_proj, add_v_proj, to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2, '
    'proj_mlp, proj_out, norm1.linear, norm1_context.linear]\'': run(expect=r"factor 1"),
    "dedistill export --checkpoint runs/tiny-cpu --out demo/export-lycoris --format lycoris --dtype fp32":
        covered("tests/integration/test_lycoris_format_cli.py::test_lycoris_export_loads_with_create_lycoris_from_weights",
                "runs this export (--format lycoris --dtype fp32) on a LoKr run and loads it with LyCORIS"),
    "dedistill train configs/tiny-cpu.yaml model.path=demo/model ...": skip("a fragment: names the quickstart's "
                                                                            "LoKr run, run above"),
    "dedistill train configs/tiny-cpu.yaml model.path=demo/model data.local=demo/data run_dir=demo/run-from-lycoris "
    "train.max_steps=2 model.adapter.init_from=demo/export-lycoris/lycoris_lokr.safetensors":
        run(paths={"demo/export-lycoris/lycoris_lokr.safetensors": "{lycoris}"}, slow=True,
            expect=r"init_from .*: \d+ LoKr layers",
            creates=("demo/run-from-lycoris/checkpoints/step_00000002/COMPLETE",)),
    "dedistill sample --cfg-skip-steps 2": skip("a fragment: the option recipes.md names for LibreFLUX's advice"),
    # docs/reliability.md
    "dedistill checkpoint verify runs/libreflux": run(expect=r"step_00000002  ok \(size and sha256 of every file\)"),
    # docs/scaling.md
    "python bench/scaling.py": covered("tests/unit/test_plan.py::test_scaling_doc_is_generated",
                                       "the script prints tables(); that test compares tables() with the docs"),
    "dedistill demo train.max_steps=600": skip("continues the 300-step demo in ./demo to 600 (minutes); the `make "
                                               "demo` case runs the command and its override syntax"),
}

DOC_COMMANDS = {c.text: c for c in collect()}


# -------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def doc_photo_mds(photo_dir, tmp_path_factory):
    from dataset_tools.convert import convert

    out = tmp_path_factory.mktemp("docs") / "photo-mds"
    convert(photo_dir, out, workers=1, progress_bar=False)
    return out


@pytest.fixture(scope="session")
def doc_photo_bucketed(doc_photo_mds, tmp_path_factory):
    from dataset_tools.buckets import BucketSpec, bucket_dataset

    out = tmp_path_factory.mktemp("docs") / "photo-bucketed"
    bucket_dataset(doc_photo_mds, out, spec=BucketSpec(resolution=256), progress_bar=False)
    return out


@pytest.fixture(scope="session")
def doc_photo_precomputed(doc_photo_mds, tiny_model_dir, tmp_path_factory):
    from dataset_tools.buckets import BucketSpec
    from dataset_tools.precompute import PrecomputeOptions, precompute

    out = tmp_path_factory.mktemp("docs") / "photo-precomputed"
    precompute(tiny_model_dir, doc_photo_mds, out, spec=BucketSpec(resolution=256), opts=PrecomputeOptions(),
               progress_bar=False)
    return out


def _train_run(tmp_path_factory, name, model, data, *extra) -> Path:
    run_dir = tmp_path_factory.mktemp("docs") / name
    cmd = [sys.executable, "-m", "launch", "train", str(REPO / "configs" / "tiny-cpu.yaml"), f"model.path={model}",
           f"data.local={data}", f"run_dir={run_dir}", "train.max_steps=2", "checkpoint.every_steps=2",
           "train.progress_bar=false", "sample.at_end=false", *extra]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="session")
def doc_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The run the sample/export/eval commands read: the tiny-cpu preset (LoKr, EMA), 2 steps, one process."""
    return _train_run(tmp_path_factory, "run", tiny_model_dir, tiny_data_dir)


@pytest.fixture(scope="session")
def doc_lycoris_file(doc_run, tmp_path_factory):
    """What recipes.md's export line writes: the tiny LoKr run's adapter as a LyCORIS file."""
    out = tmp_path_factory.mktemp("docs") / "export-lycoris"
    r = subprocess.run([sys.executable, "-m", "launch", "export", "--checkpoint", str(doc_run), "--out", str(out),
                        "--format", "lycoris", "--dtype", "fp32"], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out / "lycoris_lokr.safetensors"


# ------------------------------------------------------------------------------------------------------ the runner


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # dedistill, torchrun
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", **extra)
    return env


def _scratch_checkout(tmp: Path) -> Path:
    """A directory that looks like the checkout (symlinks), so relative doc paths work and outputs stay in tmp."""
    cwd = tmp / "checkout"
    cwd.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".git", ".venv", "runs", "demo"} and not entry.name.startswith("."):
            (cwd / entry.name).symlink_to(entry)
    return cwd


def _sub(pattern: str, repl: str, text: str) -> str:
    return re.sub(pattern, lambda m: repl, text)


def rewrite(text: str, case: Run, *, check: bool = True, prelude: bool = False) -> str:
    """The docs' command with the case's visible changes, `--out` redirected, optional groups dropped, paths mapped."""
    for old, new in case.replace:
        assert old in text or not check, f"stale replace: {old!r} is not in the documented command"
        text = text.replace(old, new)
    text = re.sub(r"(--out\s+)([^\s'\";&|]+)", lambda m: m.group(1) + "{tmp}/out/" + m.group(2).lstrip("/"), text)
    text = re.sub(r"(?<=\s)\[[^\]'\"]*\](?=\s|$)", "", text)  # `[--workers N]`: the defaults
    table = {**PATHS, **dict(case.paths)}
    for doc in sorted(table, key=len, reverse=True):
        text = _sub(rf"(?<![\w./{{}}-]){re.escape(doc)}(?![\w.-])", table[doc], text)
    if case.append and not prelude:
        text = f"{text} {case.append}"
    return " ".join(text.split())


def fill(template: str, values: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _jobs(cluster) -> dict[str, str]:
    """Every job the controller knows (finished ones stay listed for MinJobAge = 300 s): id -> state."""
    r = cluster.cmd("scontrol", "show", "job", "-o", check=False)
    jobs = {}
    for line in r.stdout.splitlines():
        m, s = re.search(r"\bJobId=(\d+)", line), re.search(r"\bJobState=(\w+)", line)
        if m and s:
            jobs[m.group(1)] = s.group(1)
    return jobs


def _wait_for_new_jobs(cluster, before: set[str], timeout: float) -> dict[str, str]:
    deadline, settled = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        new = {j: s for j, s in _jobs(cluster).items() if j not in before}
        settled = settled + 1 if new and all(s in TERMINAL for s in new.values()) else 0
        if settled >= 3:  # nothing left running, and no dependant appeared in the meantime
            return new
        time.sleep(1.0)
    raise TimeoutError(f"jobs not finished after {timeout} s: {new}\n{cluster.logs()}")


def _params():
    out = []
    for text, case in CASES.items():
        marks = []
        if isinstance(case, Run):
            if case.slow or case.slurm:
                marks.append(pytest.mark.slow)
            if case.slurm:  # one local cluster per session: under pytest-xdist its tests share one worker
                marks.append(pytest.mark.xdist_group("shared-runs"))
            if case.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        elif isinstance(case, Covered):
            marks.append(pytest.mark.skip(reason=f"run by {case.test}: {case.why}"))
        elif isinstance(case, SameAs):
            marks.append(pytest.mark.skip(reason=f"run as `{case.command[:60]}...`: {case.why}"))
        else:
            marks.append(pytest.mark.skip(reason=case.why))
        where = DOC_COMMANDS[text].locations[0] if text in DOC_COMMANDS else "stale"
        out.append(pytest.param(text, id=f"{where} {text[:60]}", marks=marks))
    return out


@pytest.mark.parametrize("text", _params())
def test_documented_command_runs(text, request, tmp_path):
    doc = DOC_COMMANDS.get(text)
    assert doc is not None, "not in the docs any more (test_every_documented_command_is_mapped says so too)"
    case = CASES[text]
    lines = [*doc.prelude, text]
    for old, _ in case.replace:  # a replace may apply to the prelude (the array job before its merge job)
        assert any(old in line for line in lines), f"stale replace: {old!r} is not in the documented command"
    cmd = "\n".join(rewrite(line, case, check=False, prelude=True) for line in lines[:-1]) + "\n" * bool(doc.prelude)
    cmd += rewrite(text, case, check=False)
    values = {"tmp": tmp_path, "bin": Path(sys.executable).parent}
    for name in set(re.findall(r"\{(\w+)\}", cmd + " ".join(case.creates))) & FIXTURES.keys():
        values[name] = request.getfixturevalue(FIXTURES[name])
    cmd = fill(cmd, values)
    cwd = _scratch_checkout(tmp_path)
    env = _env()
    cluster = request.getfixturevalue("slurm_cluster") if case.slurm else None
    if cluster is not None:  # the jobs inherit this environment (sbatch --export=ALL), as on a login node
        env = _env(SLURM_CONF=cluster.env["SLURM_CONF"], PYTHON=sys.executable, RDZV_PORT=str(_free_port()))
        env["PATH"] += os.pathsep + "/usr/sbin"
        before = set(_jobs(cluster))
    if "pt_inception-2015-12-05-6726825d.pth" in cmd:  # what the curl line downloads: pytorch-fid's state dict
        import torch
        from safetensors.torch import load_file

        sd = load_file(Path(request.getfixturevalue("tiny_model_dir")) / "eval" / "inception.safetensors")
        torch.save(sd, cwd / "pt_inception-2015-12-05-6726825d.pth")
    where = ", ".join(doc.locations)
    argv = None if cluster is not None else in_process_argv(cmd)
    if argv is not None:
        returncode, out = run_in_process(argv, cwd, request.getfixturevalue("capfd"),
                                         request.getfixturevalue("monkeypatch"))
    else:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=case.timeout)
        returncode, out = r.returncode, r.stdout + r.stderr
    how = "ran in process:" if argv is not None else "ran:"
    report = f"{where}: `{text}`\n{how} {cmd}\nexit {returncode}\n--- output (tail)\n{out[-5000:]}"
    assert returncode == 0, report
    assert "Traceback (most recent call last)" not in out, report
    if cluster is not None:  # every job the command submitted (array tasks, dependants) must end COMPLETED
        states = _wait_for_new_jobs(cluster, before, timeout=case.timeout)
        failed = {j: s for j, s in states.items() if s != "COMPLETED"}
        logs = "\n".join(f"--- {p.relative_to(cwd)}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(cwd.rglob("*.out")) + sorted(cwd.rglob("*.log")) if p.is_file())
        assert states and not failed, f"{report}\njobs: {states}\n{logs}"
    if case.expect:
        assert re.search(case.expect, out), f"{report}\nexpected /{case.expect}/"
    outs = re.findall(r"--out\s+([^\s)'\";&|]+)", cmd)
    for path in [*outs, *(fill(c, values) for c in case.creates)]:
        found = list(cwd.glob(path)) if re.search(r"[*?[]", path) else (cwd / path).exists()
        assert found, f"{report}\nmissing afterwards: {path}"
    for path in case.absent:
        assert not (cwd / fill(path, values)).exists(), f"{report}\nshould not exist afterwards: {path}"


# `dedistill` subcommands a case runs in the test process, through launch.cli.main (what the console script calls):
# each would otherwise start a Python that imports torch and diffusers again (5-8 s of CPU apiece) to do a second's
# work. `train` runs as tiny_runs.train_in_process runs it (a world of one; the environment it exports is restored).
# Not here: eval (its own process group and CUDA device choice), submit (SLURM), `--help` (that case is the test of
# the console script itself) and everything under torchrun or bash syntax.
IN_PROCESS = ("data", "describe", "plan", "export", "checkpoint", "prune", "sample", "fid", "tiny-data", "tiny-model",
              "train")
SHELL = re.compile(r"[$`;|&<>(){}*?~\[\]\\]")


def in_process_argv(cmd: str) -> list[str] | None:
    """`cmd` as the argv of an IN_PROCESS subcommand, or None when it needs bash (a prelude, several lines, an
    environment assignment, quoting bash would expand or any other shell syntax) or another command."""
    unquoted = re.sub(r"'[^']*'|\"[^\"$`\\]*\"", "", cmd)
    if "\n" in cmd or SHELL.search(unquoted):
        return None
    words = shlex.split(cmd)
    if len(words) < 2 or words[0] != "dedistill" or words[1] not in IN_PROCESS:
        return None
    return words[1:]


def run_in_process(argv: list[str], cwd: Path, capfd, monkeypatch) -> tuple[int, str]:
    """Exit status and output of `dedistill ARGV` run by launch.cli.main in `cwd`, as the console script runs it."""
    import traceback

    from launch.cli import main

    monkeypatch.chdir(cwd)
    code = 0
    with environment_kept():
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - reported as the process would print it
            sys.stderr.write(traceback.format_exc())
            code = 1
    out = capfd.readouterr()
    return code, out.out + out.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- the drift checks


def test_every_documented_command_is_mapped():
    """A command shown in the docs needs a CASES entry (run or skip with a reason), and every entry a command."""
    unmapped = [f"{', '.join(c.locations)}: {c.text}" for t, c in DOC_COMMANDS.items() if t not in CASES]
    stale = [t for t in CASES if t not in DOC_COMMANDS]
    assert not unmapped, ("the docs show commands tests/system/test_docs_commands.py does not run; add a CASES line for "
                          "each (run(...) or skip(why)):\n" + "\n".join(unmapped))
    assert not stale, "CASES entries the docs no longer show (remove them):\n" + "\n".join(stale)


def test_covering_tests_exist():
    """A `covered` command names a test that exists, in a test file of a tier."""
    for text, case in CASES.items():
        if isinstance(case, Covered):
            path, name = case.test.split("::")
            assert re.fullmatch(r"tests/(unit|integration|system)/test_\w+\.py", path), (text, case.test)
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{text}: {case.test} is gone"


def _program(cmd: str) -> tuple[str, list[str]]:
    """The program and the scripts/configs a command runs: what two commands must share to be the same job."""
    words = shlex.split(cmd)
    return words[0], [w for w in words if w.startswith(("slurm/", "configs/", "bench/"))]


def test_same_as_names_a_command_that_runs():
    """A `same_as` command names a documented command that this file runs: one that runs this line as its prelude, or
    the same program over the same script and config."""
    for text, case in CASES.items():
        if isinstance(case, SameAs):
            assert isinstance(CASES.get(case.command), Run), (text, case.command)
            assert case.command in DOC_COMMANDS, f"{text}: `{case.command}` is not in the docs any more"
            assert text in DOC_COMMANDS[case.command].prelude or _program(text) == _program(case.command), (
                text, case.command)


def test_skips_and_changes_say_why():
    for text, case in CASES.items():
        if isinstance(case, (Skip, Covered, SameAs)):
            assert len(case.why) > 15, text
        elif case.replace or case.append:
            assert case.why, text


def test_collector_rules(tmp_path):
    """What counts as a command: continuations, comments, prompts, compound statements, tables, prose, names."""
    from doc_commands import collect

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# x\n\n```bash\ndedistill train a.yaml \\\n    b=1   # comment\nfor g in 0 1; do\n  echo $g &\ndone; wait\n"
        "jid=$(sbatch --parsable x.sbatch)\nsbatch --dependency=afterok:$jid y.sbatch\n```\n\n"
        "```console\n$ dedistill --help\nusage: dedistill ...\n```\n\n```\nsource ──dedistill data convert──► raw\n"
        "  dedistill data inspect DIR\nmake demo\n```\n\n```yaml\nrun_dir: x\n```\n\n"
        "| a | b |\n|---|---|\n| `dedistill submit` | `python -m dataset_tools.buckets 1024` \\| `x` |\n\n"
        "Run `dedistill demo\ntrain.max_steps=2` or `dedistill: error: no`; see `sbatch`.\n"
    )
    got = {c.text: c for c in collect(tmp_path)}
    assert list(got) == [
        "dedistill train a.yaml b=1", "for g in 0 1; do echo $g & done; wait", "jid=$(sbatch --parsable x.sbatch)",
        "sbatch --dependency=afterok:$jid y.sbatch", "dedistill --help", "make demo",
        "python -m dataset_tools.buckets 1024", "dedistill demo train.max_steps=2",
    ]
    assert got["sbatch --dependency=afterok:$jid y.sbatch"].prelude == ["jid=$(sbatch --parsable x.sbatch)"]
    assert got["dedistill train a.yaml b=1"].locations == ["README.md:4"]
    assert got["dedistill demo train.max_steps=2"].locations == ["README.md:32"]


def test_rewrite_maps_paths_and_outputs_only():
    case = Run(paths=(("SRC", "{photos}"),))
    assert rewrite("dedistill data convert --source SRC --out DATA [--workers N] [--check fast|full]", case) == (
        "dedistill data convert --source {photos} --out {tmp}/out/DATA")
    assert rewrite("dedistill train CONFIG.yaml data.local=DATA_B data.resolution=1024", Run()) == (
        "dedistill train configs/tiny-cpu.yaml data.local={photo_b} data.resolution=1024")
    assert rewrite("dedistill eval coco --checkpoint runs/libreflux/checkpoints/step_00016000", Run()) == (
        "dedistill eval coco --checkpoint {run}/checkpoints/step_00000002")
    assert rewrite("x sampling.cfg_scales='[1, 3.5]' --checkpoint /shared/runs/libreflux-8n/tb", Run()) == (
        "x sampling.cfg_scales='[1, 3.5]' --checkpoint {tmp}/shared/runs/libreflux-8n/tb")
