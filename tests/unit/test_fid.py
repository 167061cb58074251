"""FID: the Fréchet distance against independent computations, the FID Inception against torchvision's blocks and
pytorch-fid's key naming, reference statistics (folder, MDS, cache) and the `dedistill fid` CLI."""

import io
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from evals.assets import write_random_inception
from evals.fid import Stats, fid_from_stats, frechet_distance, reference_stats, stats_of_images
from evals.inception import FIDInceptionV3, inception_features, load_inception


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on 2 shared cores: a second intra-op thread mostly waits (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shapes(n: int, *, seed: int, kind: str, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        x, y = rng.integers(4, size // 2, 2)
        r = int(rng.integers(8, size // 2 - 4))
        fill = (int(rng.integers(150, 256)), 20, 20) if kind == "circle" else (20, 20, int(rng.integers(150, 256)))
        (d.ellipse if kind == "circle" else d.rectangle)([x, y, x + r, y + r], fill=fill)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception.safetensors", seed=0)


@pytest.fixture(scope="module")
def inception(weights):
    return load_inception(weights)


# ------------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # For diagonal covariances sqrt(S1 S2) is diag(sqrt(v1 v2)), so d² = |mu1-mu2|² + Σ (√v1 - √v2)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, abs=1e-3)
    assert expected > 1.0  # a non-trivial distance, so the comparison can fail


def test_frechet_distance_matches_symmetric_eigen_formula_for_full_covariances():
    """Independent route: Tr sqrt(S1 S2) = Tr sqrt(S1^½ S2 S1^½), computed with eigh only (no sqrtm)."""
    rng = np.random.default_rng(1)
    d = 24
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    tr_covmean = np.trace(psd_sqrt(r1 @ s2 @ r1))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-3)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="fid.dims"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------------- network


def test_state_dict_keys_are_pytorch_fids():
    """pytorch-fid loads its .pth strictly into torchvision's Inception3(num_classes=1008, aux_logits=False)."""
    from torchvision.models.inception import Inception3

    with torch.device("meta"):
        ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        ours = FIDInceptionV3()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@contextmanager
def patched_torchvision_pool(kind: str):
    """torchvision's own block code with the TF pooling swapped in: the reference for the FID blocks."""
    import torchvision.models.inception as tv

    orig = tv.F.avg_pool2d

    def avg_no_pad(x, kernel_size, stride=None, padding=0, **kw):
        if kind == "max":
            return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)
        return orig(x, kernel_size, stride, padding, count_include_pad=False)

    tv.F.avg_pool2d = avg_no_pad
    try:
        yield
    finally:
        tv.F.avg_pool2d = orig


@pytest.mark.parametrize(
    "name, kind", [("Mixed_5b", "avg"), ("Mixed_6b", "avg"), ("Mixed_7b", "avg"), ("Mixed_7c", "max")]
)
def test_fid_blocks_equal_torchvision_blocks_with_tf_pooling(inception, name, kind):
    import torchvision.models.inception as tv

    block = getattr(inception, name)
    parent = dict(Mixed_5b=tv.InceptionA, Mixed_6b=tv.InceptionC, Mixed_7b=tv.InceptionE, Mixed_7c=tv.InceptionE)[name]
    x = torch.randn(2, block.branch1x1.conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(0)).abs()
    with torch.no_grad():
        plain = torch.cat(parent._forward(block, x), 1)  # torchvision's pooling: counts the zero padding
        with patched_torchvision_pool(kind):
            expected = torch.cat(parent._forward(block, x), 1)
        got = block(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain)  # the TF pooling matters at the borders


def test_features_match_torchvision_forward_with_the_same_weights(weights):
    """Block wiring, resize to 299 and [0,1] -> [-1,1] against torchvision's Inception3._forward (pool3 via a hook)."""
    from safetensors.torch import load_file
    from torchvision.models.inception import Inception3

    ours = load_inception(weights)
    ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b",
                 "Mixed_7c"):
        setattr(ref, name, getattr(ours, name))  # the TF-pooling blocks (tested against torchvision above)
    ref.load_state_dict(load_file(str(weights)), strict=False)
    ref.eval()
    pooled = {}
    ref.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault("x", o.flatten(1)))
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref(2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    torch.testing.assert_close(ours.features(x, 2048), pooled["x"], rtol=1e-4, atol=1e-5)


def test_pool_features_have_the_requested_dims_and_spread(inception):
    ims = shapes(3, seed=0, kind="circle")
    for dims in (64, 2048):
        f = inception_features(inception, ims, dims=dims)
        assert f.shape == (3, dims) and f.dtype == np.float64 and np.isfinite(f).all()
        assert f.std(0).mean() > 1e-4  # different images give different features


def test_mixed_sizes_equal_per_image(inception):
    a, b = shapes(1, seed=1, kind="circle")[0], shapes(1, seed=2, kind="square", size=48)[0]
    both = inception_features(inception, [a, b], dims=64)
    np.testing.assert_allclose(both[1], inception_features(inception, [b], dims=64)[0], rtol=1e-5, atol=1e-6)


def test_load_inception_errors_name_the_key(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match=r"^fid.inception_weights: file not found: .*nope.safetensors"):
        load_inception(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="fid.inception_weights: .*pytorch-fid's naming"):
        load_inception(bad)


# ---------------------------------------------------------------------------------------------------- statistics


def test_identical_sets_give_zero_and_different_sets_do_not(inception):
    circles, squares = shapes(8, seed=0, kind="circle"), shapes(8, seed=1, kind="square")
    a = stats_of_images(inception, circles, dims=192)
    a2 = stats_of_images(inception, list(circles), dims=192, batch_size=3)  # batching does not change features
    b = stats_of_images(inception, squares, dims=192)
    same, different = fid_from_stats(a, a2), fid_from_stats(a, b)
    assert abs(same) < 1e-4  # float32 batching noise only
    assert different > 1e3 * max(abs(same), 1e-9)


def write_folder(path, images):
    path.mkdir(parents=True)
    for i, im in enumerate(images):
        im.save(path / f"{i:03d}.png")
    (path / "notes.txt").write_text("not an image")
    return path


def write_mds(path, images, captions):
    from streaming import MDSWriter

    with MDSWriter(out=str(path), columns={"image": "bytes", "caption": "str"}) as w:
        for im, c in zip(images, captions):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            w.write({"image": buf.getvalue(), "caption": c})
    return path


def test_reference_stats_from_folder_and_mds_agree_and_are_cached(inception, weights, tmp_path, monkeypatch):
    images = shapes(6, seed=3, kind="circle")
    folder = write_folder(tmp_path / "folder", images)
    mds = write_mds(tmp_path / "mds", images, [f"c{i}" for i in range(6)])
    cache = tmp_path / "cache"
    kw = dict(model=inception, weights=weights, dims=64, cache_dir=cache)
    s_folder = reference_stats(folder, **kw)
    s_mds = reference_stats(mds, **kw)
    np.testing.assert_allclose(s_folder.mu, s_mds.mu)
    np.testing.assert_allclose(s_folder.sigma, s_mds.sigma)
    assert s_folder.n == 6 and len(list(cache.glob("*.npz"))) == 2

    import evals.fid as fid_mod

    monkeypatch.setattr(fid_mod, "stats_of_images", lambda *a, **k: pytest.fail("cache miss"))
    again = reference_stats(folder, **kw)
    np.testing.assert_array_equal(again.sigma, s_folder.sigma)
    monkeypatch.undo()
    fewer = reference_stats(folder, **kw, count=4)  # another image count is another cache entry
    assert fewer.n == 4 and len(list(cache.glob("*.npz"))) == 3
    assert not np.allclose(fewer.mu, s_folder.mu)


def test_cli_fid_prints_like_pytorch_fid(weights, inception, tmp_path, capsys):
    from launch.cli import main

    circles, squares = shapes(8, seed=4, kind="circle"), shapes(8, seed=5, kind="square")
    a, b = write_folder(tmp_path / "a", circles), write_folder(tmp_path / "b", squares)
    mds_b = write_mds(tmp_path / "b_mds", squares, ["x"] * 8)

    def run(*args):
        main(["fid", *map(str, args), "--weights", str(weights), "--dims", "64"])
        out = capsys.readouterr().out.strip().splitlines()[-1]
        assert out.startswith("FID:  "), out
        return float(out.split()[-1])

    expected = fid_from_stats(
        stats_of_images(inception, circles, dims=64), stats_of_images(inception, squares, dims=64)
    )
    assert run(a, b) == pytest.approx(expected, rel=1e-6)
    assert run(a, mds_b) == pytest.approx(expected, rel=1e-6)  # an MDS dir is as good as a folder
    assert abs(run(a, a)) < 1e-6

    main(["fid", str(a), str(tmp_path / "a.npz"), "--weights", str(weights), "--dims", "64", "--save-stats"])
    capsys.readouterr()
    assert run(tmp_path / "a.npz", b) == pytest.approx(expected, rel=1e-6)  # pytorch-fid's .npz round trip
    with np.load(tmp_path / "a.npz") as f:
        assert set(f.files) >= {"mu", "sigma"}


def test_cli_fid_missing_weights_is_one_line(tmp_path, capsys):
    from launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fid", str(tmp_path), str(tmp_path), "--weights", str(tmp_path / "w.safetensors")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dedistill: error: --weights: file not found") and "\n" not in err


def test_stats_need_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        Stats.of(np.zeros((1, 8)))
