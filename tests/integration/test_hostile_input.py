# tier: integration
"""Hostile input to `dedistill data convert`: each crafted sample is counted by reason in report.json, the good
samples convert, and no read is unbounded.

The inputs are made here, small: a symlink to /dev/zero, an 8 GiB sparse file, a gzip tar whose one member inflates
to 512 MiB, a FIFO, PNG/JPEG headers claiming 60000 x 60000, names and captions that are not UTF-8, JSON nested
100,000 deep, a parquet manifest with timestamp and binary columns, link and device tar members. Conversions that
could exhaust memory or hang run in a subprocess whose address space is capped (RLIMIT_AS: its size after the imports
plus 768 MiB) under a timeout; it reports its peak RSS, which the tests bound. The rest run in-process under
pytest-timeout.
"""

import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_tools.convert import ConvertOptions, convert

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def encode(size, fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A real 8x8 PNG whose IHDR (with a valid CRC) claims w x h: a few hundred bytes."""
    data = bytearray(encode((8, 8), "PNG"))
    i = data.index(b"IHDR")
    data[i + 4 : i + 12] = struct.pack(">II", w, h)
    data[i + 17 : i + 21] = struct.pack(">I", zlib.crc32(bytes(data[i : i + 17])))
    return bytes(data)


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 segment claims w x h."""
    data = bytearray(encode((8, 8), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def add_good(root: Path, n: int, prefix: str = "good") -> None:
    for i in range(n):
        (root / f"{prefix}{i}.png").write_bytes(encode((64, 64), "PNG", i))
        (root / f"{prefix}{i}.txt").write_text(f"caption {i}")


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def skipped_files(out: Path) -> dict[str, str]:
    """file name (last path part) -> reason, from report.json's list."""
    return {Path(e["file"].split(":")[-1]).name: e["reason"] for e in report(out)["skipped_samples"]}


# A convert in a subprocess: address space capped after the imports, peak RSS reported.
_DRIVER = r"""
import json, resource, sys, time
import PIL.Image, pyarrow.parquet, streaming, tqdm  # what convert imports lazily: loaded before the cap
from dataset_tools.convert import ConvertOptions, convert

def vm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1])

cap = vm_kib() * 1024 + 768 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for source, out, opts in json.loads(sys.argv[1]):
    t0 = time.perf_counter()
    r = convert(source, out, opts=ConvertOptions(**opts), progress_bar=False)
    results.append({"converted": r["converted"], "skipped_by_reason": r["skipped_by_reason"],
                    "s": round(time.perf_counter() - t0, 2)})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": results, "rss_growth_mib": (peak - base) / 1024}))
"""


def run_capped(jobs: list[tuple[Path, Path, dict]], timeout: float = 120) -> dict:
    arg = json.dumps([(str(s), str(o), opts) for s, o, opts in jobs])
    p = subprocess.run([sys.executable, "-c", _DRIVER, arg], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    print(got)  # the measurements, for `pytest -s`
    return got


def gzip_tar_bomb(path: Path, member_bytes: int) -> None:
    """A gzip-compressed .tar (named .tar, as WebDataset shards are) with one good sample and then a member that
    inflates to `member_bytes` of zeros; written in 1 MiB steps, so the test never holds it."""

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for name, data in (("ok.png", encode((64, 64))), ("ok.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.png")
        info.size = member_bytes
        tf.addfile(info, io.BufferedReader(Zeros(member_bytes), buffer_size=MiB))
        info = tarfile.TarInfo("bomb.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"boom"))


# ------------------------------------------------------------------------------------------- row 1: unbounded reads


@pytest.mark.timeout(300)
def test_dev_zero_sparse_file_and_gzip_bomb_are_skipped_unread(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    add_good(folder, 2)
    os.symlink("/dev/zero", folder / "zero.png")
    (folder / "zero.txt").write_text("endless")
    with open(folder / "sparse.png", "wb") as f:
        f.truncate(8 << 30)  # 8 GiB, no block allocated
    (folder / "sparse.txt").write_text("huge")

    manifest = tmp_path / "m" / "rows.jsonl"
    manifest.parent.mkdir()
    (manifest.parent / "ok.png").write_bytes(encode((64, 64)))
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"path": "ok.png", "caption": "fine"}, {"path": "/dev/zero", "caption": "endless"},
        {"path": str(folder / "sparse.png"), "caption": "huge"}]) + "\n")

    tar = tmp_path / "tars" / "bomb.tar"
    tar.parent.mkdir()
    gzip_tar_bomb(tar, 512 * MiB)
    assert tar.stat().st_size < 4 * MiB  # small on disk, 512 MiB inflated

    got = run_capped([(folder, tmp_path / "o1", {}), (manifest, tmp_path / "o2", {}), (tar, tmp_path / "o3", {})])
    f, m, t = got["results"]
    assert (f["converted"], f["skipped_by_reason"]) == (2, {"not_a_regular_file": 1, "too_large": 1})
    assert (m["converted"], m["skipped_by_reason"]) == (1, {"not_a_regular_file": 1, "too_large": 1})
    assert (t["converted"], t["skipped_by_reason"]) == (1, {"too_large": 1})
    assert skipped_files(tmp_path / "o1") == {"zero.png": "not_a_regular_file", "sparse.png": "too_large"}
    assert "8,589,934,592 bytes > --max-bytes" in json.dumps(report(tmp_path / "o1"))  # from stat, not a read
    assert got["rss_growth_mib"] < 256  # the 512 MiB member and the 8 GiB file were never held


# ------------------------------------------------------------------------------------------------- row 2: FIFOs


@pytest.mark.timeout(120)
def test_fifo_is_never_opened(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    add_good(folder, 2)
    os.mkfifo(folder / "pipe.png")  # opening it for reading would block until a writer comes: none will
    (folder / "pipe.txt").write_text("never")
    os.mkfifo(folder / "cap.txt")  # a FIFO sidecar
    (folder / "cap.png").write_bytes(encode((64, 64), seed=5))
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"path": str(folder / "pipe.png"), "caption": "x"}) + "\n"
                        + json.dumps({"path": str(folder / "good0.png"), "caption": "y"}) + "\n")

    got = run_capped([(folder, tmp_path / "o1", {}), (manifest, tmp_path / "o2", {})], timeout=60)
    f, m = got["results"]
    assert (f["converted"], f["skipped_by_reason"]) == (2, {"not_a_regular_file": 2})
    assert (m["converted"], m["skipped_by_reason"]) == (1, {"not_a_regular_file": 1})
    assert "a FIFO" in json.dumps(report(tmp_path / "o1"))


# ------------------------------------------------------------------------------------------- row 3: pixel bombs


@pytest.mark.timeout(60)
def test_pixel_bombs_are_counted_undecoded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 2)
    bombs = {"bomb_png.png": png_claiming(60000, 60000), "bomb_jpg.jpg": jpeg_claiming(65000, 65000),
             "big_png.png": png_claiming(12000, 12000)}
    for name, data in bombs.items():
        assert len(data) < 2000
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text("bomb")
    r = convert(src, tmp_path / "out", opts=ConvertOptions(check="full"), progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (2, {"too_many_pixels": 3})
    assert skipped_files(tmp_path / "out") == {name: "too_many_pixels" for name in bombs}
    # the limit is an option: under a lower one, the 64 x 64 images are bombs too
    with pytest.raises(ValueError, match="too_many_pixels: 5"):
        convert(src, tmp_path / "out2", opts=ConvertOptions(max_pixels=64 * 64 - 1), progress_bar=False)


# ------------------------------------------------------------------------------------- row 4: not UTF-8 names/text


@pytest.mark.timeout(60)
def test_undecodable_names_keys_and_captions_are_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 2)
    raw = os.fsencode(src)
    with open(raw + b"/bad\xffname.png", "wb") as f:
        f.write(encode((64, 64), seed=9))
    with open(raw + b"/bad\xffname.txt", "wb") as f:
        f.write(b"a fine caption")
    r = convert(src, tmp_path / "out", progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (2, {"bad_key": 1})
    assert [e["key"] for e in report(tmp_path / "out")["skipped_samples"]] == ["bad\\udcffname"]  # valid UTF-8

    # a manifest whose caption, or key, is a lone surrogate (valid JSON, not encodable as UTF-8)
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"path": str(src / "good0.png"), "caption": "ok"}),
        '{"path": "%s", "caption": "bad \\udcff caption"}' % (src / "good1.png"),
        '{"path": "%s", "key": "k\\udcff", "caption": "fine"}' % (src / "good1.png"),
    ]) + "\n")
    r = convert(manifest, tmp_path / "out2", progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (1, {"bad_key": 1, "undecodable_caption": 1})


# ------------------------------------------------------------------------------------------- row 5: deep JSON


@pytest.mark.timeout(60)
def test_json_nested_100000_deep_is_a_bad_caption_or_row(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 2)
    (src / "deep.png").write_bytes(encode((64, 64), seed=3))
    (src / "deep.json").write_text(deep)
    r = convert(src, tmp_path / "out", progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (2, {"undecodable_caption": 1})
    assert "nested too deep" in (tmp_path / "out" / "report.json").read_text()

    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"path": str(src / "good0.png"), "caption": "ok"}) + "\n" + deep + "\n"
                        + '{"path": "%s", "caption": "x", "meta": %s}\n' % (src / "good1.png", deep))
    r = convert(manifest, tmp_path / "out2", progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (1, {"bad_row": 2})


@pytest.mark.timeout(60)
def test_manifest_line_over_max_bytes_is_a_bad_row_read_in_bounded_steps(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 2)
    manifest = tmp_path / "rows.jsonl"
    with open(manifest, "w") as f:
        f.write(json.dumps({"path": str(src / "good0.png"), "caption": "ok"}) + "\n")
        f.write('{"path": "x", "caption": "' + "a" * (3 * MiB) + '"}\n')  # one 3 MiB line
        f.write(json.dumps({"path": str(src / "good1.png"), "caption": "ok"}))  # the last line has no newline
    r = convert(manifest, tmp_path / "out", opts=ConvertOptions(max_bytes=MiB), progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (2, {"bad_row": 1})
    assert "line over --max-bytes" in (tmp_path / "out" / "report.json").read_text()


# -------------------------------------------------------------------------------- row 6: parquet non-JSON columns


@pytest.mark.timeout(60)
def test_parquet_timestamp_kept_as_text_binary_dropped_with_a_line(tmp_path, capsys):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from launch.cli import main

    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 2)
    when = datetime.datetime(2024, 5, 6, 7, 8, 9)
    table = pa.table({"path": [str(src / "good0.png"), str(src / "good1.png")], "caption": ["a", "b"],
                      "taken": pa.array([when, when], pa.timestamp("us")), "blob": [b"\x00\xff", b"\x01"],
                      "score": [0.5, 0.25]})
    pq.write_table(table, tmp_path / "rows.parquet")
    main(["data", "convert", "--source", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "out"),
          "--no-progress"])
    said = capsys.readouterr().out
    assert "rows.parquet: extra columns kept as text: taken; dropped (binary or nested): blob" in said
    assert report(tmp_path / "out")["converted"] == 2

    from streaming import LocalDataset

    attrs = LocalDataset(local=str(tmp_path / "out"))[0]["attributes"]
    assert attrs == {"taken": "2024-05-06 07:08:09.000000", "score": 0.5}


# ----------------------------------------------------------------------------- also: stored size, tar links, rerun


@pytest.mark.timeout(60)
def test_images_over_max_side_are_stored_downscaled(tmp_path):
    from streaming import LocalDataset

    from train.images import open_rgb

    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 1)
    (src / "wide.jpg").write_bytes(encode((1000, 200), "JPEG", 4))
    (src / "wide.txt").write_text("wide")
    r = convert(src, tmp_path / "out", opts=ConvertOptions(max_side=500), progress_bar=False)
    assert r["converted"] == 2 and report(tmp_path / "out")["resized"] == 1
    rows = {s["key"]: s for s in LocalDataset(local=str(tmp_path / "out"))}
    wide = rows["wide"]
    assert (wide["width"], wide["height"]) == (500, 100) == open_rgb(wide["image"]).size
    assert Image.open(io.BytesIO(wide["image"])).format == "JPEG"
    assert rows["good0"]["image"] == (src / "good0.png").read_bytes()  # under the cap: the original bytes
    r = convert(src, tmp_path / "out2", opts=ConvertOptions(max_side=0), progress_bar=False)
    assert report(tmp_path / "out2")["resized"] == 0


@pytest.mark.timeout(60)
def test_link_and_device_tar_members_are_counted(tmp_path):
    tar = tmp_path / "links.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("ok.png", encode((64, 64))), ("ok.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("sym.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE), ("dev.png", tarfile.CHRTYPE),
                           ("fifo.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/dev/zero" if kind == tarfile.SYMTYPE else "ok.png"
            tf.addfile(info)
    r = convert(tar, tmp_path / "out", progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (1, {"not_a_regular_file": 4})


@pytest.mark.timeout(60)
def test_rerun_after_a_crash_finishes_with_the_bad_sample_counted(tmp_path):
    """A crash leaves a part with shards and index.json but no report.json; the rerun starts the part over, and the
    sample that crashed the first run is a counted skip, not the same crash again."""
    src = tmp_path / "src"
    src.mkdir()
    add_good(src, 3)
    (src / "bomb.png").write_bytes(png_claiming(60000, 60000))
    (src / "bomb.txt").write_text("bomb")
    part = tmp_path / "out" / "part-00000-0000"
    part.mkdir(parents=True)
    (part / "shard.00000.mds").write_bytes(b"half a shard")
    (part / "index.json").write_text('{"shards": [], "version": 2}')
    r = convert(src, tmp_path / "out", progress_bar=False)
    assert (r["converted"], r["skipped_by_reason"]) == (3, {"too_many_pixels": 1})
    assert report(part)["converted"] == 3


# ------------------------------------------------------------------------------ row 7: hostile model-dir configs

FLUX1 = json.loads((REPO / "configs/models/flux1-schnell/transformer/config.json").read_text())


def model_dir(root: Path, config) -> Path:
    """A diffusers-format FLUX dir with empty component folders and this transformer/config.json."""
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return root


def test_real_flux_sizes_are_within_the_schema():
    from train.model_schema import check_transformer_config

    check_transformer_config(FLUX1, where="flux1")
    flux2_dev = {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "num_layers": 8,
                 "num_single_layers": 48, "attention_head_dim": 128, "num_attention_heads": 48,
                 "joint_attention_dim": 15360, "axes_dims_rope": [32, 32, 32, 32], "mlp_ratio": 3.0}
    check_transformer_config(flux2_dev, where="flux2")
    check_transformer_config({"_class_name": "ChromaTransformer2DModel", "approximator_hidden_dim": 5120,
                              "approximator_layers": 5, **{k: v for k, v in FLUX1.items() if k[0] != "_"}},
                             where="chroma")


HOSTILE_CONFIGS = [
    ({**FLUX1, "num_layers": 100_000}, "num_layers: 100000 is outside [0, 1024]"),
    ({**FLUX1, "joint_attention_dim": 2**31}, "joint_attention_dim: 2147483648 is outside [1, 65536]"),
    ({**FLUX1, "num_layers": "2"}, "num_layers: expected an integer, got '2'"),
    ({**FLUX1, "guidance_embeds": "no"}, "guidance_embeds: expected true/false"),
    ({**FLUX1, "axes_dims_rope": 16}, "axes_dims_rope: expected a list"),
    ({**FLUX1, "num_attention_heads": 1024, "attention_head_dim": 1024}, "is over 65536"),
    ([FLUX1], "expected a JSON object of transformer settings, got a list"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config,said", HOSTILE_CONFIGS, ids=["layers", "width", "string", "bool", "rope",
                                                              "heads", "list"])
def test_hostile_model_config_is_one_line_naming_the_key_before_any_build(tmp_path, config, said, capsys):
    from launch.cli import main
    from train.model import build_transformer_meta, check_model_dir

    path = model_dir(tmp_path / "model", config)
    with pytest.raises(ValueError, match="model.path: .*transformer/config.json: ") as e:
        check_model_dir(path)
    assert said in str(e.value) and "\n" not in str(e.value)
    if isinstance(config, dict):
        with pytest.raises(ValueError, match="transformer config: "):
            build_transformer_meta(config)
    # `plan` and `train` say it as one line and exit 2, before building anything
    for argv in (["plan", "tiny-cpu", f"model.path={path}"],
                 ["train", "tiny-cpu", f"model.path={path}", f"run_dir={tmp_path / 'run'}"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- row 8: YAML aliases; row 10: config


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text,alias", [(ALIAS_BOMB, "*a"), ("run_dir: &r [*r]\n", "*r"),
                                        ("model: &m {path: x}\nsample: *m\n", "*m")],
                         ids=["bomb", "self", "plain"])
def test_yaml_aliases_in_configs_are_refused_in_one_line(tmp_path, text, alias, capsys):
    from launch.cli import main
    from train.config import load_config

    cfg = tmp_path / "evil.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=f"not valid YAML \\(found the alias \\{alias}: aliases are not allowed"):
        load_config(cfg)
    with pytest.raises(SystemExit) as e:
        main(["describe", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "aliases are not allowed" in err


def test_yaml_nested_too_deep_is_one_line(tmp_path):
    from train.config import load_config

    cfg = tmp_path / "deep.yaml"
    cfg.write_text("sample:\n  prompts: " + "[" * 5_000 + "]" * 5_000 + "\n")
    with pytest.raises(ValueError, match="deep.yaml: not valid YAML \\(nested too deep\\)"):
        load_config(cfg)


@pytest.mark.parametrize("key", ["prompts", "cfg_scales"])
def test_empty_sample_grid_is_a_config_error_at_load(key):
    from train.config import load_config

    with pytest.raises(ValueError, match=f"sample.{key}: empty"):
        load_config(None, [f"sample.{key}=[]"])


# ------------------------------------------------------------------------------ row 9: odd paths reach the job whole

ODD = "m #x: 'q' \"d\" é 名"  # a space, ` #` (a YAML comment), `: ` (a YAML mapping), quotes, unicode


def test_string_overrides_keep_their_text_exactly():
    from train.config import load_config

    paths = {"model.path": f"/data/{ODD}", "run_dir": "runs/0777", "data.local": "/d/1.0e3", "eval.suite": "a: b"}
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"{k}={v}" for k, v in paths.items()])
    assert (cfg.model.path, cfg.run_dir, cfg.data.local, cfg.eval.suite) == tuple(paths.values())
    # quoting still works, and non-string keys still read YAML
    cfg = load_config(None, ['sample.negative_prompt="quoted"', "train.max_steps=7", "sample.prompts=[a, b]"])
    assert (cfg.sample.negative_prompt, cfg.train.max_steps, cfg.sample.prompts) == ("quoted", 7, ["a", "b"])


FAKE_SRUN = "#!/bin/bash\nprintf '%s\\0' \"$@\" > \"$FAKE_DIR/srun.argv\"\n"
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo n1 ;;
  "show node") echo "   NodeAddr=10.0.0.1 NodeHostName=$3" ;;
esac
"""


@pytest.mark.timeout(120)
def test_train_sbatch_hands_odd_paths_to_the_job_exactly(tmp_path):
    """slurm/train.sbatch with fake srun/scontrol: the argv srun gets is parsed by the job's own config loader."""
    from launch.cli import _preset
    from train.config import load_config

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_NAME": "d"}
    values = {"model.path": f"/data/{ODD}", "run_dir": f"/runs/{ODD}", "data.local": f"/mds/{ODD}"}
    r = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), "configs/tiny-cpu.yaml",
                        *(f"{k}={v}" for k, v in values.items())], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    job_args = argv[argv.index("train") + 1 :]  # what `python -m train` receives
    cfg = load_config(REPO / _preset(job_args[0]), job_args[1:])
    assert (cfg.model.path, cfg.run_dir, cfg.data.local) == tuple(values.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_local_hands_odd_paths_to_the_job_exactly(tmp_path, tiny_model_dir, tiny_data_dir):
    """A real `dedistill submit --cluster local` (submitit's local executor, launch.torchrun, one training step)
    with the model, data and run dir under a directory named ODD: the run's recorded config holds them exactly."""
    import shutil

    odd = tmp_path / ODD
    shutil.copytree(tiny_model_dir, odd / "model")
    shutil.copytree(tiny_data_dir, odd / "data")
    values = {"model.path": str(odd / "model"), "data.local": str(odd / "data"), "run_dir": str(odd / "run")}
    cmd = [sys.executable, "-m", "launch", "submit", "configs/tiny-cpu.yaml", "--cluster", "local",
           *(f"{k}={v}" for k, v in values.items()), "train.max_steps=1", "checkpoint.every_steps=1",
           "sample.at_end=false", "train.progress_bar=false"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "'finished': True" in r.stdout, (r.stdout + r.stderr)[-4000:]
    from train.config import load_run_config

    cfg = load_run_config(odd / "run")
    assert (cfg.model.path, cfg.data.local, cfg.run_dir) == tuple(values.values())
    assert (odd / "run" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


@pytest.mark.timeout(300)
def test_fid_skips_and_counts_a_corrupt_image(tmp_path, capsys):
    from evals.assets import write_random_inception
    from launch.cli import main

    weights = write_random_inception(tmp_path / "inception.safetensors", seed=0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"ok{i}.png").write_bytes(encode((32, 32), "PNG", i))
    (folder / "bad.png").write_bytes(encode((32, 32), "PNG", 9)[:60])  # truncated
    (folder / "bomb.png").write_bytes(png_claiming(60000, 60000))
    main(["fid", str(folder), str(tmp_path / "s.npz"), "--save-stats", "--weights", str(weights), "--dims", "64",
          "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"fid: skipped 2 unreadable image(s) of {folder} (first: bad.png: " in err
    from evals.fid import Stats

    assert Stats.load(tmp_path / "s.npz").mu.shape == (64,)


# ------------------------------------------------------------------ also: a pickle swapped and the manifest re-hashed


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(path: Path) -> None:
    """What an attacker with write access does after swapping a file: a manifest that matches again."""
    from train.checkpoint.verify import MARKER, digest

    marker = json.loads((path / MARKER).read_text())
    marker["files"] = {name: digest(path / name) for name in marker["files"]}
    (path / MARKER).write_text(json.dumps(marker))


@pytest.mark.timeout(120)
def test_swapped_and_rehashed_pickles_are_refused_by_verify_and_resume_in_one_line(tmp_path):
    import torch

    from train.checkpoint import CheckpointStore, RefusedFile
    from train.checkpoint.verify import verify_run
    from train.config import CheckpointConfig

    pwned = tmp_path / "PWNED"
    # 1. a per-rank file replaced
    manager = CheckpointStore(tmp_path / "a", CheckpointConfig(), rank=0)
    path = manager.save(1, {"model": {"w": torch.arange(4.0)}}, per_rank={"data": None})
    assert verify_run(tmp_path / "a")[0] == ["step_00000001  ok (size and sha256 of every file)"]
    torch.save({"rng": _Evil(pwned)}, path / "rank_00000.pt")
    _rehash(path)
    lines, newest_bad = verify_run(tmp_path / "a")
    assert newest_bad and re.match(r"step_00000001  BAD rank_00000.pt: refused by the safe loader: its pickle names "
                                   r"(posix|os)\.system", lines[0]), lines
    assert manager.resume_from(log=lambda _: None) == path  # the bytes match the manifest ...
    with pytest.raises(RefusedFile) as e:  # ... but the load refuses, naming the file, in one line
        manager.load(path, {"model": {"w": torch.empty(4)}})
    said = str(e.value)
    assert "rank_00000.pt refused, nothing loaded" in said and "\n" not in said and "weights_only" not in said

    # 2. a non-tensor DCP entry (the shards hold torch.save pickles of them)
    manager = CheckpointStore(tmp_path / "b", CheckpointConfig(), rank=0)
    path = manager.save(1, {"model": {"w": torch.arange(4.0)}, "extra": {"note": _Evil(pwned)}}, per_rank={})
    lines, newest_bad = verify_run(tmp_path / "b")
    assert newest_bad and ".distcp (entry extra.note): refused by the safe loader" in lines[0], lines
    with pytest.raises(RefusedFile, match=r"\.distcp \(entry extra\.note\) refused, nothing loaded"):
        manager.load(path, {"model": {"w": torch.empty(4)}, "extra": {"note": None}})
    assert not pwned.exists()


def test_max_bytes_cli_default_is_the_library_default():
    from dataset_tools.cli import _bytes
    from launch.cli import _load_extensions, build_parser

    _load_extensions()
    args = build_parser().parse_args(["data", "convert", "--source", "s", "--out", "o"])
    assert _bytes(args.max_bytes, "--max-bytes") == ConvertOptions().max_bytes
