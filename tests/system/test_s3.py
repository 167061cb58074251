"""A real S3 endpoint (moto's server on 127.0.0.1, started here): shards uploaded with boto3, then training streams
them from s3://… through streaming's own S3 client. Nothing inside the loader is mocked; the endpoint and dummy
credentials come from the environment, as on a cluster with MinIO/Ceph (S3_ENDPOINT_URL, AWS_*)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BUCKET = "dedistill-data"


@pytest.fixture(scope="module")
def s3_endpoint():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def upload(client, local: Path, prefix: str) -> int:
    n = 0
    for path in sorted(local.rglob("*")):
        if path.is_file() and "parts" not in path.relative_to(local).parts:
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")
            n += 1
    return n


_TRAIN = """
import json, sys
from evals.periodic import trainer_hooks
from train.config import load_config
from train.trainer import train
cfg = load_config(sys.argv[1], sys.argv[3:])
state = train(cfg, trainer_hooks(cfg))
print("RESULT " + json.dumps({"step": state.step, "losses": [h["loss"] for h in state.history]}), flush=True)
"""


def run_train(env: dict, run: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-c", _TRAIN, str(REPO / "configs" / "tiny-cpu.yaml"), str(run),
           f"run_dir={run}", "train.max_steps=2", "train.log_every=1", "train.progress_bar=false",
           "checkpoint.every_steps=2", "sample.at_end=false", "eval.every_steps=0", *overrides]
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"train failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    retries = [x for x in r.stderr.splitlines() if x.startswith("data.remote: retry #")]  # train/remote.py
    return {**json.loads(line[len("RESULT "):]), "retry_lines": retries}


def test_stream_and_train_from_s3(s3_endpoint, tiny_model_dir, tiny_data_dir, tmp_path):
    env, client = s3_endpoint
    assert upload(client, tiny_data_dir, "tiny/raw") >= 3
    remote = f"s3://{BUCKET}/tiny/raw"

    # The loader alone: every sample of the remote arrives, and the local cache fills from S3.
    from train.config import DataConfig
    from train.data import build_loader

    cache = tmp_path / "cache_loader"
    loader = build_loader(DataConfig(remote=remote, local=str(cache), resolution=64, shuffle=False), batch_size=8)
    captions = [c for batch in loader for c in batch["caption"]]
    assert len(captions) == 128 and len(set(captions)) > 64
    assert sorted(p.name for p in cache.glob("shard.*.mds")) == sorted(
        s["raw_data"]["basename"] for s in json.loads((tiny_data_dir / "index.json").read_text())["shards"])

    # The trainer, in its own process, from s3:// (a different cache dir: a live dataset owns the first).
    result = run_train(env, tmp_path / "run", [f"model.path={tiny_model_dir}", f"data.remote={remote}",
                                               f"data.local={tmp_path / 'cache_train'}", "parallel.dist_backend=gloo"])
    assert result["step"] == 2 and all(isinstance(x, float) for x in result["losses"])
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_bucketed_precomputed_from_s3(s3_endpoint, tiny_model_dir, tmp_path):
    """buckets.json and empty_prompt.safetensors come from the remote too; one stream per bucket under it."""
    from dataset_tools.buckets import BucketSpec
    from dataset_tools.precompute import PrecomputeOptions, precompute
    from test_buckets import make_aspect_mds

    env, client = s3_endpoint
    raw, _ = make_aspect_mds(tmp_path, n=24)
    pre = tmp_path / "pre"
    precompute(tiny_model_dir, raw, pre, spec=BucketSpec(resolution=64),
               opts=PrecomputeOptions(dtype="fp16", max_text_tokens=64), progress_bar=False)
    upload(client, pre, "tiny/pre")

    from train.config import DataConfig
    from train.data import build_loader

    cache = tmp_path / "cache"
    loader = build_loader(DataConfig(remote=f"s3://{BUCKET}/tiny/pre", local=str(cache), resolution=64,
                                     buckets=True), batch_size=2)
    shapes = {tuple(b["latent_mean"].shape) for b in loader}
    assert len(shapes) == 3 and (cache / "buckets.json").is_file() and (cache / "empty_prompt.safetensors").is_file()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["b000", "b001", "b002"]
    del loader

    # The trainer on precomputed, bucketed shards from S3 (no image is decoded, no text encoded for the batches).
    result = run_train(env, tmp_path / "run", [f"model.path={tiny_model_dir}", f"data.remote=s3://{BUCKET}/tiny/pre",
                                               f"data.local={tmp_path / 'cache_train'}", "data.buckets=true",
                                               "parallel.dist_backend=gloo"])
    assert result["step"] == 2 and all(x == x for x in result["losses"])
