"""CLIP score: the maths by hand, the implementation against the model's own feature functions, the tiny CLIP files."""

import numpy as np
import pytest
import torch
from PIL import Image

from evals.assets import write_tiny_clip
from evals.clip_score import CLIPScorer, clip_score_from_cosines


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on 2 shared cores: a second intra-op thread mostly waits (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


def images(n, seed=0, size=48):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a red circle", "a small blue square at the top left", "a green star on a white background"]


def test_score_is_100_times_the_mean_cosine_clamped_at_zero():
    assert clip_score_from_cosines([1.0, 1 / np.sqrt(2)]) == pytest.approx(100 * (1 + 1 / np.sqrt(2)) / 2)
    # torchmetrics clamps the mean, not each pair: -0.2 and 0.6 average to 0.2 -> 20, not (0 + 60) / 2 = 30.
    assert clip_score_from_cosines([-0.2, 0.6]) == pytest.approx(20.0)
    assert clip_score_from_cosines([-0.5, -0.1]) == 0.0
    with pytest.raises(ValueError):
        clip_score_from_cosines([])


def test_scorer_equals_direct_computation_with_the_model(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    scorer = CLIPScorer(clip_dir)
    ims = images(3)
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = CLIPProcessor.from_pretrained(str(clip_dir), use_fast=False)  # the PIL reference, as the scorer
    with torch.no_grad():
        inputs = proc(text=CAPTIONS, images=ims, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    # transformers 5 (the GPU machine's) returns the output object, its pooler_output holding the projection
    img, txt = (f if isinstance(f, torch.Tensor) else f.pooler_output for f in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).double().numpy()
    got = scorer.cosines(ims, CAPTIONS, batch_size=2)  # batching must not change anything
    np.testing.assert_allclose(got, cos, rtol=1e-5, atol=1e-6)
    assert scorer.score(ims, CAPTIONS) == pytest.approx(max(100 * cos.mean(), 0.0), rel=1e-5)
    assert np.ptp(got) > 1e-4  # different pairs, different cosines: the comparison can fail


def test_an_image_scores_highest_with_its_own_embedding_direction(clip_dir):
    """Score a caption against an 'image' whose embedding is that caption's: cosine 1 -> score 100."""
    scorer = CLIPScorer(clip_dir)
    txt = scorer.text_embeds(CAPTIONS)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    own = (txt * txt).sum(-1)
    assert clip_score_from_cosines(own.numpy()) == pytest.approx(100.0, abs=1e-3)
    # and the images' embeddings are unit vectors too
    assert torch.allclose(scorer.image_embeds(images(2)).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_long_captions_are_truncated_not_fatal(clip_dir):
    scorer = CLIPScorer(clip_dir)
    long = " ".join(["red circle"] * 200)
    assert np.isfinite(scorer.cosines(images(1), [long])).all()


def test_missing_or_wrong_model_dir_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^clip.model: model dir not found: "):
        CLIPScorer(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"^clip.model: .*config.json"):
        CLIPScorer(tmp_path)


def test_tiny_clip_is_deterministic_and_reuses_a_given_tokenizer(clip_dir, tmp_path):
    again = write_tiny_clip(tmp_path / "again", seed=0)
    files = sorted(p.name for p in clip_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for f in files:
        assert (clip_dir / f).read_bytes() == (again / f).read_bytes(), f

    from transformers import CLIPTokenizerFast

    CLIPTokenizerFast.from_pretrained(str(clip_dir)).save_pretrained(tmp_path / "tok")
    reused = write_tiny_clip(tmp_path / "reused", seed=1, tokenizer_dir=tmp_path / "tok")
    assert (reused / "tokenizer.json").read_bytes() == (clip_dir / "tokenizer.json").read_bytes()
    w0 = (clip_dir / "model.safetensors").read_bytes()
    assert w0 != (reused / "model.safetensors").read_bytes()  # another seed, other weights
