"""`dedistill data convert`: three source kinds, exact skip counts per defect, workers, slices, merge, resume."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mds_read import open_mds

from dataset_tools.convert import ConvertOptions, check_image, convert, merge, part_of
from dataset_tools.report import Skip

REPO = Path(__file__).resolve().parents[2]


def encode(size, fmt, seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    arr = (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def corrupt_png(size=(48, 40)):
    """A PNG whose image data has a flipped byte: the chunk CRC no longer matches."""
    data = bytearray(encode(size, "PNG", seed=7))
    i = data.index(b"IDAT") + 20
    data[i] ^= 0xFF
    return bytes(data)


# Defects, each a known count: reason -> list of (name, image bytes or None, caption bytes or None).
def defect_samples():
    good = [(f"good{i:02d}", encode((40 + 8 * (i % 4), 48 + 16 * (i % 3)), ("PNG", "JPEG", "WEBP")[i % 3], i),
             f"a caption number {i}".encode()) for i in range(12)]
    jpg = encode((64, 48), "JPEG", 1)
    png = encode((64, 48), "PNG", 2)
    webp = encode((64, 48), "WEBP", 3)
    bad = {
        "truncated_image": [("trunc_jpg", jpg[: len(jpg) // 2], b"cut jpeg"),
                            ("trunc_png", png[: len(png) * 2 // 3], b"cut png"),
                            ("trunc_webp", webp[: len(webp) // 2], b"cut webp")],
        "corrupt_image": [("flipped_png", corrupt_png(), b"bit flip")],
        "empty_file": [("zero1", b"", b"zero"), ("zero2", b"", b"zero")],
        "not_an_image": [("text_as_jpg", b"this is not an image at all\n" * 20, b"fake")],
        "missing_caption": [("nocap1", encode((40, 40), "PNG", 11), None), ("nocap2", encode((40, 40), "JPEG", 12), None)],
        "empty_caption": [("emptycap", encode((40, 40), "PNG", 13), b"   \n\t")],
        "undecodable_caption": [("badutf8", encode((40, 40), "PNG", 14), b"\xff\xfe\xfa bad bytes")],
        "too_small": [("small1", encode((16, 64), "PNG", 15), b"thin"), ("small2", encode((20, 20), "JPEG", 16), b"tiny")],
    }
    return good, bad


EXT = {b"\x89P": ".png", b"\xff\xd8": ".jpg", b"RI": ".webp"}


def ext_of(data):
    return EXT.get(data[:2], ".jpg")


def write_folder(root: Path):
    good, bad = defect_samples()
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    for i, (name, img, cap) in enumerate(good + [s for v in bad.values() for s in v]):
        d = root / "sub" if i % 2 else root
        (d / (name + ext_of(img))).write_bytes(img)
        if cap is not None:
            (d / (name + ".txt")).write_bytes(cap)
    # A duplicate key: the same stem with a second image extension (good00 is a PNG in the root dir).
    (root / "good00.webp").write_bytes(encode((40, 40), "WEBP", 99))
    # A JSON sidecar: caption field plus attributes; and a stray file that is not a sample.
    (root / "withjson.png").write_bytes(encode((48, 48), "PNG", 21))
    (root / "withjson.json").write_text(json.dumps({"caption": "from json", "score": 0.5}))
    (root / "notes.md").write_text("not a sample")
    expected = {k: len(v) for k, v in bad.items()}
    expected["duplicate_key"] = 1
    return len(good) + 1, expected


def test_folder_counts_every_defect_exactly(tmp_path):
    n_good, expected = write_folder(tmp_path / "src")
    out = tmp_path / "mds"
    r = convert(tmp_path / "src", out, opts=ConvertOptions(min_size=32), progress_bar=False)
    assert r["converted"] == n_good
    assert r["skipped_by_reason"] == expected

    report = json.loads((out / "report.json").read_text())
    assert report["converted"] == n_good and report["skipped_by_reason"] == expected
    listed = {(e["key"], e["reason"]) for e in report["skipped_samples"]}
    assert ("trunc_jpg", "truncated_image") in listed and ("sub/zero2", "empty_file") in listed
    assert ("good00", "duplicate_key") in listed
    assert all(Path(e["file"]).name.startswith(Path(e["key"]).name) for e in report["skipped_samples"])

    ds = open_mds(out)
    samples = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert len(samples) == n_good
    s = samples["withjson"]
    assert s["caption"] == "from json" and s["attributes"] == {"score": 0.5}
    good, _ = defect_samples()
    for i, (name, img, cap) in enumerate(good):
        key = f"sub/{name}" if i % 2 else name
        assert samples[key]["image"] == img  # the original encoded bytes, not re-encoded
        assert samples[key]["caption"] == cap.decode()
        assert (samples[key]["width"], samples[key]["height"]) == Image.open(io.BytesIO(img)).size
    assert samples["good00"]["image"][:4] == b"\x89PNG"  # the first of the duplicates (sorted) is kept


def write_tars(root: Path):
    good, bad = defect_samples()
    root.mkdir(parents=True)
    items = good + [s for v in bad.values() for s in v]
    for t in range(3):
        with tarfile.open(root / f"shard-{t:03d}.tar", "w") as tf:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

            for name, img, cap in items[t::3]:
                add(f"{name}{ext_of(img)}", img)
                if cap is not None:
                    add(f"{name}.txt", cap)
            if t == 0:  # the same key again later in the tar: a duplicate
                add(f"{items[3][0]}{ext_of(items[3][1])}", items[3][1])
                add(f"{items[3][0]}.txt", items[3][2])
                add("jsoncap.png", encode((40, 40), "PNG", 31))
                add("jsoncap.json", json.dumps({"caption": "caption in json", "source": "x"}).encode())
    expected = {k: len(v) for k, v in bad.items()}
    expected["duplicate_key"] = 1
    return len(good) + 1, expected


def test_webdataset_tars_with_workers(tmp_path):
    n_good, expected = write_tars(tmp_path / "tars")
    # A damaged tar: the first sample survives, the rest of the archive is reported once.
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tf:
        for name in ("x1", "x2"):
            for ext, data in ((".png", encode((40, 40), "PNG", 41)), (".txt", b"damaged tar sample")):
                info = tarfile.TarInfo(name + ext)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(whole) as tf:
        cut = tf.getmember("x2.png").offset_data + 50  # inside the second sample's image
    (tmp_path / "tars" / "shard-003.tar").write_bytes(whole.read_bytes()[:cut])
    expected["bad_archive"] = 1
    out = tmp_path / "mds"
    r = convert(tmp_path / "tars", out, opts=ConvertOptions(min_size=32), workers=2, progress_bar=False)
    assert r["skipped_by_reason"] == expected
    assert r["converted"] == n_good + 1
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000-0000", "part-00000-0001"]
    index = json.loads((out / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == n_good + 1
    assert all(s["raw_data"]["basename"].startswith("part-00000-000") for s in index["shards"])


def test_manifest_jsonl_and_parquet(tmp_path):
    good, bad = defect_samples()
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = []
    for name, img, cap in good + bad["truncated_image"] + bad["missing_caption"]:
        (img_dir / (name + ext_of(img))).write_bytes(img)
        rows.append({"path": f"imgs/{name}{ext_of(img)}", "caption": None if cap is None else cap.decode(), "id": name})
    rows.append({"path": "imgs/does_not_exist.jpg", "caption": "gone", "id": "gone"})
    rows.append({"path": rows[0]["path"], "caption": "again", "id": "good00"})  # duplicate key
    expected = {"truncated_image": 3, "missing_caption": 2, "missing_file": 1, "duplicate_key": 1}

    jsonl = tmp_path / "manifest.jsonl"
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"caption": "no path"})]
    jsonl.write_text("\n".join(lines) + "\n")
    opts = ConvertOptions(min_size=32, key_field="id")
    r = convert(jsonl, tmp_path / "out_jsonl", opts=opts, workers=1, progress_bar=False)
    assert r["converted"] == len(good) and r["skipped_by_reason"] == {**expected, "bad_row": 2}

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    r = convert(tmp_path / "manifest.parquet", tmp_path / "out_pq", opts=opts, progress_bar=False)
    assert r["converted"] == len(good) and r["skipped_by_reason"] == expected


def test_slices_are_disjoint_cover_the_source_and_merge(tmp_path):
    """Three SLURM-array-style slices (the middle one with 2 workers) == one run; merge refuses until all ran."""
    n_good, expected = write_folder(tmp_path / "src")
    opts = ConvertOptions(min_size=32)
    whole = convert(tmp_path / "src", tmp_path / "whole", opts=opts, progress_bar=False)
    out = tmp_path / "sliced"
    parts = []
    for i, workers in ((0, 1), (2, 1), (1, 2)):
        r = convert(tmp_path / "src", out, opts=opts, shard_index=i, num_shards=3, workers=workers, progress_bar=False)
        assert not r["merged"]
        parts.append(r)
        if i == 2:
            with pytest.raises(ValueError, match=r"slices \[1\] of 3 have not run"):
                merge(out)
    assert sum(p["converted"] for p in parts) == whole["converted"] == n_good
    report = merge(out)
    assert report["skipped_by_reason"] == expected  # duplicates are caught across slices: same key, same part

    keys = []
    for d in (tmp_path / "whole", out):
        ds = open_mds(d)
        keys.append(sorted(ds[i]["key"] for i in range(len(ds))))
    assert keys[0] == keys[1] and len(set(keys[1])) == n_good
    # The assignment is a pure function of the key.
    assert part_of("sub/good01", 3, 2) == part_of("sub/good01", 3, 2)
    assert {part_of(f"k{i}", 4, 1)[0] for i in range(100)} == {0, 1, 2, 3}


def test_rerun_resumes_finished_parts_and_redoes_unfinished(tmp_path):
    write_folder(tmp_path / "src")
    out = tmp_path / "mds"
    opts = ConvertOptions(min_size=32)
    first = [convert(tmp_path / "src", out, opts=opts, shard_index=i, num_shards=2, progress_bar=False) for i in (0, 1)]
    done = out / "part-00000-0000" / "report.json"
    stamp = done.stat().st_mtime_ns
    (out / "part-00001-0000" / "report.json").unlink()  # as if slice 1 was killed before it finished
    (out / "part-00001-0000" / "junk").write_text("half-written")
    with pytest.raises(ValueError, match="unfinished parts part-00001-0000"):
        merge(out)
    again = [convert(tmp_path / "src", out, opts=opts, shard_index=i, num_shards=2, progress_bar=False) for i in (0, 1)]
    assert [r["converted"] for r in again] == [r["converted"] for r in first]
    assert done.stat().st_mtime_ns == stamp  # the finished part was not redone
    assert not (out / "part-00001-0000" / "junk").exists()
    assert merge(out)["converted"] == sum(r["converted"] for r in first)
    with pytest.raises(ValueError, match=r"part-00000-0000: finished by an earlier run with other settings \(min_size"):
        convert(tmp_path / "src", out, opts=ConvertOptions(min_size=8), num_shards=2, progress_bar=False)


def test_fast_check_matches_full_decode_on_defects():
    good, bad = defect_samples()
    for reason, items in bad.items():
        if reason in ("missing_caption", "empty_caption", "undecodable_caption"):
            continue
        for _, img, _ in items:
            for mode in ("fast", "full"):
                with pytest.raises(Skip) as e:
                    check_image(img, min_size=32, check=mode)
                assert e.value.reason == reason, (reason, mode, e.value)
    # JPEG with bytes appended after its end marker (as some cameras write): fast falls back to a decode, keeps it.
    jpg = encode((64, 48), "JPEG", 5) + b"TRAILER" * 10
    assert check_image(jpg, min_size=32) == ("JPEG", 64, 48)


def test_exif_rotation_swaps_width_and_height():
    img = Image.new("RGB", (80, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed as 40x80
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert check_image(buf.getvalue(), min_size=8) == ("JPEG", 40, 80)
    # any format: a PNG's eXIf chunk counts too, so the recorded size is the one train.images.open_rgb decodes
    from train.images import open_rgb

    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    assert check_image(buf.getvalue(), min_size=8) == ("PNG", 40, 80) and open_rgb(buf.getvalue()).size == (40, 80)


def test_cli_errors_are_one_line_and_nothing_converted_fails(tmp_path, capsys):
    from launch.cli import main

    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "a.txt").write_text("cap")
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", "--source", str(src), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("dedistill: error: nothing converted") and "empty_file: 1" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"dedistill: error: --source: '{tmp_path / 'nope'}' does not exist"

    good = tmp_path / "good"
    good.mkdir()
    (good / "x.png").write_bytes(encode((40, 40), "PNG"))
    (good / "x.txt").write_text("a caption")
    main(["data", "convert", "--source", str(good), "--out", str(tmp_path / "o3"), "--no-progress", "--min-size", "8"])
    assert capsys.readouterr().out.startswith("converted 1, skipped 0 (none)")


def test_cli_defaults_convert_with_the_progress_bar(tmp_path, capsys):
    """`dedistill data convert --source DIR --out DIR` exactly as a user types it: one worker, progress bar on (a
    tqdm without a total, whose truth value raises) — the path the other tests above switch off."""
    from launch.cli import main

    src = tmp_path / "photos"
    src.mkdir()
    for i, fmt in enumerate(("PNG", "JPEG", "WEBP")):
        (src / f"img{i}.{fmt.lower()}").write_bytes(encode((96 + 16 * i, 80), fmt, i))
        (src / f"img{i}.txt").write_text(f"caption {i}")
    main(["data", "convert", "--source", str(src), "--out", str(tmp_path / "mds")])
    out, err = capsys.readouterr()
    assert out.startswith("converted 3, skipped 0 (none)"), out
    assert "convert photos" in err  # the bar was drawn
    assert (tmp_path / "mds" / "index.json").is_file()
