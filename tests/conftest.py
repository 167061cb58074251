"""Shared fixtures. The tiny pipeline and dataset are written once per session (both deterministic for a seed), and
once for all pytest-xdist workers (`built_once`)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import xdist
from filelock import FileLock
from packaging.version import Version

# The suite in tiers: unit/ (in process), integration/ (the CLI, torchrun, several processes), system/ (SLURM, S3,
# the documented commands). This folder holds what every tier shares (tiny_runs, tiny_nets, the helper scripts,
# fixtures/). A few test modules import a fixture or helper of a module in another tier by its name (test_s3's S3
# server, test_buckets' data set): each tier's folder is on the path, so that name is the module pytest collected.
for _tier in ("unit", "integration", "system"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / _tier))

# Under pytest-xdist the workers share the cores: each worker, and every process its tests start (which inherit the
# variable), runs torch on its share instead of one thread per core each, which oversubscribes the machine.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

# torch's CPU allocator asks for transparent huge pages on its blocks of 2 MB and more (read by c10 at the first such
# allocation; every process the tests start inherits it). The training processes here allocate and free gigabytes of
# gather buffers and activations each step, and with 4 KiB pages the kernel's page faulting was about half of their CPU
# time (full-width test: 88 of 183 s in the kernel). Memory, not numerics: every result stays bitwise the same.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


SHARED_RUNS = ("slurm_cluster",)
"""Session fixtures that only one worker may hold: the local SLURM cluster (one slurmctld, one state directory)."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`make test`'s default, `-n 2 --dist loadgroup`) each worker builds the session fixtures its
    tests need, and a module's fixtures are built once only if its tests run on one worker:
    - the tests on the local SLURM cluster share one worker (one cluster); the documented commands that submit to it
      say so themselves. The reference run is not grouped (that would hold every resume test on one worker behind the
      SLURM jobs): the first worker that needs it trains it, and the other reuses it (`built_once`);
    - the tests of a module with a module-scoped fixture (a tiny training, an exported pipeline) stay together."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if any(n in names for n in SHARED_RUNS):
            item.add_marker(pytest.mark.xdist_group("shared-runs"))
            continue
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope == "module" for fixture in defs.values() for d in fixture):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The modules holding `slow` (multi-process) tests first: xdist hands out work in collection order, so the long
        # tests start while every worker is busy with one, and the many short in-process tests fill the workers' ends
        # instead of one long test running alone at the end. A module stays whole (its fixtures are built once), and
        # the sort is stable, so every worker collects the same order.
        slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)


_GROUPS_LOST = ("--dist loadgroup cannot group tests with pytest {pytest} and pytest-xdist {xdist} (pytest-xdist issue "
                "1386: every worker would rebuild every module's fixtures); install the pins: pip install -c "
                "constraints.txt -e '.[dev]'")


def pytest_configure(config):
    """On the controller, before any worker starts: refuse the pytest/pytest-xdist pair whose loadgroup is broken."""
    if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    if Version(pytest.__version__) >= Version("9.2") and Version(xdist.__version__) <= Version("3.8.0"):
        raise pytest.UsageError(_GROUPS_LOST.format(pytest=pytest.__version__, xdist=xdist.__version__))


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")  # after xdist's own hook
def pytest_collection_modifyitems_check_groups(config, items):
    """On each worker: the groups did reach the node ids (the check above is by version; this one by effect)."""
    if not getattr(config.option, "loadgroup", False):
        return
    if any(any(i.iter_markers("xdist_group")) and "@" not in i.nodeid for i in items):
        raise pytest.UsageError(_GROUPS_LOST.format(pytest=pytest.__version__, xdist=xdist.__version__))


@pytest.fixture(autouse=True)
def _environ_restored():
    """Each test leaves os.environ as it found it. In-process training (train.parallelize.init_distributed) exports
    RANK/WORLD_SIZE/MASTER_PORT for a world of one while its TCPStore keeps listening on that port; a later test's
    subprocess that inherited them would try to bind the same port (EADDRINUSE) or think it is rank 0 of a group."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, however many pytest-xdist workers need it: the first worker builds it
    in the session's shared temp root while holding a file lock, the others wait for the lock and reuse the result
    (pytest-xdist's documented recipe). For deterministic fixtures that tests only read: before, each worker wrote
    and trained its own copy of the same bytes. Without xdist it is an ordinary session fixture."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent
    done = root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():  # no earlier worker finished it (one that failed left no marker: build it again)
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(str(build(folder)))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny FLUX pipeline in diffusers layout (`dedistill tiny-model`, seed 0)."""
    from dataset_tools.tiny_model import write_tiny_model

    return built_once(tmp_path_factory, "tiny-model", lambda d: write_tiny_model(d / "model", seed=0))


@pytest.fixture(scope="session")
def tiny_chroma_dir(tmp_path_factory):
    """A random tiny Chroma pipeline (`dedistill tiny-model --family chroma`, seed 0): ChromaPipeline's layout."""
    from dataset_tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_chroma") / "model", seed=0, family="chroma")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """128 procedural 64 px samples as MDS shards (`dedistill tiny-data`, seed 0)."""
    from dataset_tools.tiny_data import write_tiny_data

    return built_once(tmp_path_factory, "tiny-data", lambda d: write_tiny_data(d / "data", n=128, size=64, seed=0))


@pytest.fixture(scope="session")
def reference_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The uninterrupted tiny run every resume/backend test compares with: 2 gloo ranks, FSDP2, 6 steps, a checkpoint
    every 2 (tests/tiny_runs.py). Started with `dedistill submit --cluster local` (submitit's local executor ->
    launch.torchrun --standalone), the path users without SLURM take; the tests that compare plain torchrun runs
    with it bitwise also check that this path trains exactly the same job. Trained once per session (tests copy it
    before they resume from it)."""
    import tiny_runs

    def build(folder: Path) -> Path:
        run_dir = folder / "run"
        cmd = [sys.executable, "-m", "launch", "submit", str(tiny_runs.CONFIG), "--cluster", "local",
               "--nproc-per-node", "2", *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir)]
        r = tiny_runs.run(cmd)
        assert "local job" in r.stdout and "'finished': True" in r.stdout, r.stdout[-2000:]
        return run_dir

    return built_once(tmp_path_factory, "reference", build)


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A 4-step LoRA run in one process (`dedistill train`, in the test process): rank 4, alpha 8, lr 0.02 so the B
    matrices move well away from zero, no EMA. The LoRA export tests and the docs' `--format lora` commands read it:
    one training for all."""
    import tiny_runs

    def build(folder: Path) -> Path:
        run_dir = folder / "run"
        over = {"model.adapter.kind": "lora", "model.adapter.rank": 4, "model.adapter.alpha": 8.0, "optim.lr": 0.02,
                "ema.decay": 0.0}
        tiny_runs.cli("train", tiny_runs.CONFIG, *tiny_runs.overrides(tiny_model_dir, tiny_data_dir, run_dir, steps=4,
                                                                       **over))
        return run_dir

    return built_once(tmp_path_factory, "lora", build)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real local SLURM cluster (munged, slurmctld, two slurmd "nodes"), installed from Debian packages if missing
    (as root) and stopped by PID at the end (tests/slurm_cluster.py). Skips only where it cannot be installed."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from slurm_cluster import LocalSlurmCluster, ensure_installed

    reason = ensure_installed()
    if reason:
        if os.environ.get("DEDISTILL_REQUIRE_SLURM") == "1":  # CI sets it where apt should work: fail, not skip
            pytest.fail(f"DEDISTILL_REQUIRE_SLURM=1 but SLURM is unavailable: {reason}")
        pytest.skip(f"no SLURM: {reason}")
    base = Path(tempfile.mkdtemp(prefix="dedistill-slurm-"))  # not under pytest's 0700 tmp: munge must enter it
    cluster = LocalSlurmCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("DEDISTILL_KEEP_SLURM"):  # set it to keep the logs and state for a post-mortem
            shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ real photos

PHOTOS = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "photos"

# name -> (source in tests/fixtures/photos, how it is written, caption). Every odd mode a user's folder holds.
PHOTO_FILES = {
    "rocket.jpg": ("rocket.jpg", "copy", "a rocket lifting off from a launch pad into a blue sky"),
    "chelsea.jpg": ("chelsea.jpg", "copy", "a tabby cat looking to the side"),
    "astronaut.jpg": ("astronaut.jpg", "copy", "an astronaut in an orange suit in front of a flag"),
    "camera_l.png": ("camera.jpg", "L", "a black and white photo of a man with a camera on a tripod"),
    "camera_16bit.png": ("camera.jpg", "I;16", "a black and white photo of a man with a camera, 16-bit"),
    "astronaut_p.png": ("astronaut.jpg", "P", "an astronaut, a small palette image with a transparent colour"),
    "astronaut_rgba.png": ("astronaut.jpg", "RGBA", "an astronaut fading into transparency"),
    "coffee_cmyk.jpg": ("coffee.jpg", "CMYK", "a cup of coffee on a saucer, CMYK"),
    "coffee_exif.jpg": ("coffee.jpg", "EXIF6", "a cup of coffee on a saucer, stored rotated"),
}


def write_photo(name: str, dest_dir):
    """Write one entry of PHOTO_FILES into dest_dir; returns its path."""
    import numpy as np
    from PIL import Image

    src, how, _ = PHOTO_FILES[name]
    dest = dest_dir / name
    if how == "copy":
        dest.write_bytes((PHOTOS / src).read_bytes())
        return dest
    img = Image.open(PHOTOS / src)
    if how == "L":
        img.convert("L").save(dest)
    elif how == "I;16":  # 16-bit grayscale PNG: the 8-bit values spread over 0..65535 (x 257)
        Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(dest)
    elif how == "P":  # 172 px, 64 colours, palette index 0 transparent (tRNS)
        img.convert("RGB").resize((172, 172), Image.LANCZOS).quantize(colors=64).save(dest, transparency=0)
    elif how == "RGBA":  # alpha from 255 (left) to 0 (right): the right edge is fully transparent
        rgba = img.convert("RGBA")
        w, h = rgba.size
        alpha = np.tile(np.linspace(255, 0, w).round().astype(np.uint8), (h, 1))
        rgba.putalpha(Image.fromarray(alpha, mode="L"))
        rgba.save(dest)
    elif how == "CMYK":
        img.convert("RGB").convert("CMYK").save(dest, format="JPEG", quality=95)
    elif how == "EXIF6":  # stored turned 90 degrees counter-clockwise, tagged "rotate 90 CW to display"
        exif = Image.Exif()
        exif[0x0112] = 6
        img.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(dest, format="JPEG", quality=95, exif=exif)
    else:
        raise AssertionError(how)
    return dest


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """Real photos (tests/fixtures/photos, public domain / CC0 from scikit-image) as a user's folder with sidecar .txt
    captions, in every odd mode: RGB JPEG, L PNG, 16-bit PNG, palette PNG with a transparent index, RGBA PNG, CMYK
    JPEG and an EXIF-rotated JPEG; 172 to 640 px, square and not."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    root.mkdir()
    for name, (_, _, caption) in PHOTO_FILES.items():
        write_photo(name, root)
        (root / name).with_suffix(".txt").write_text(caption + "\n")
    return root


@pytest.fixture(scope="session")
def photo_jsonl(photo_dir):
    """The same photos as a .jsonl manifest ({path, caption}; paths relative to the manifest's directory)."""
    import json

    manifest = photo_dir.parent / "photos.jsonl"
    rows = [{"path": f"photos/{name}", "caption": caption} for name, (_, _, caption) in PHOTO_FILES.items()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="session")
def photo_wds(photo_dir):
    """The same photos as WebDataset: a folder with one .tar (`<key>.<ext>` + `<key>.txt` per sample)."""
    import tarfile

    out = photo_dir.parent / "wds"
    out.mkdir()
    with tarfile.open(out / "photos-000000.tar", "w") as tf:
        for name in PHOTO_FILES:
            stem = name.rsplit(".", 1)[0]
            tf.add(photo_dir / name, arcname=f"{stem}.{name.rsplit('.', 1)[1]}")
            tf.add(photo_dir / f"{stem}.txt", arcname=f"{stem}.txt")
    return out
