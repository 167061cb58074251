"""evals/experiments/ablate.py: the one-hot attribute conditioning reaches the trainer's batches as written, and the
ablation driver trains and reads every checkpoint."""

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from mds_read import open_mds
from streaming import LocalDataset

from dataset_tools.tiny_data import COLOURS, POSITIONS, SHAPES, SIZES, iter_samples
from evals.experiments import ablate
from evals.experiments.judge import judge_images, load_judge, to_tensor
from evals.experiments.proof import held_out_world, load_model, load_proof_config, run
from evals.sampler import SamplingSettings, generate
from train.config import DataConfig
from train.data import build_loader
from train.model import load_vae
from train.text import TextEncoder


def _decode(token: torch.Tensor) -> dict:
    """Read a one-hot object token back into attributes (the inverse the test holds the writer to)."""
    out, at = {}, 0
    for k, values in (("shape", list(SHAPES)), ("colour", sorted(COLOURS)), ("position", list(POSITIONS)),
                      ("size", sorted(SIZES))):
        block = token[at:at + len(values)]
        assert sorted(block.tolist()).count(ablate.ONEHOT_SCALE) == 1 and block.sum() == ablate.ONEHOT_SCALE, k
        out[k] = values[int(block.argmax())]
        at += len(values)
    return out


def test_tokens_name_every_attribute_once():
    attrs = {"objects": [{"shape": "star", "colour": "red", "position": "top left", "size": "large"},
                         {"shape": "ring", "colour": "blue", "position": "center", "size": "small"}],
             "background": "gray"}
    tokens, pooled = ablate.onehot_tokens(attrs, 32)
    assert tokens.shape == (3, 32)
    assert [_decode(t) for t in tokens[:2]] == attrs["objects"]
    assert tokens[:2, ablate.OBJECT_FLAG].tolist() == [ablate.ONEHOT_SCALE] * 2
    bg = tokens[2]
    assert bg[ablate.BACKGROUND_FLAG] == ablate.ONEHOT_SCALE and bg.count_nonzero() == 2
    assert sorted(COLOURS)[int(bg[7:19].argmax())] == "gray"
    assert torch.equal(pooled, tokens[0])
    with pytest.raises(ValueError, match="text width 16"):
        ablate.onehot_tokens(attrs, 16)


@pytest.mark.parametrize("roles", [False, True], ids=["words", "words-roles"])
def test_word_tokens_are_one_per_word_and_bind_nothing_but_the_role_flag(roles):
    attrs = {"objects": [{"shape": "star", "colour": "red", "position": "top left", "size": "large"},
                         {"shape": "ring", "colour": "blue", "position": "center", "size": "small"}],
             "background": "red"}
    tokens, pooled = ablate.word_tokens(attrs, 32, roles=roles)
    assert tokens.shape == (9, 32) and ablate.WORD_TOKENS == 13
    blocks = (("shape", list(SHAPES)), ("colour", sorted(COLOURS)), ("position", list(POSITIONS)),
              ("size", sorted(SIZES)))
    words = set()
    for i, t in enumerate(tokens):  # each token is one word: a single block set, and nothing says whose it is
        assert t.count_nonzero() == 1 + (roles and i == len(tokens) - 1) and t.max() == ablate.ONEHOT_SCALE
        at = 0
        for k, values in blocks:
            if t[at:at + len(values)].any():
                words.add((k, values[int(t[at:at + len(values)].argmax())]))
            at += len(values)
    assert words == {(k, o[k]) for o in attrs["objects"] for k in ("shape", "colour", "position", "size")}
    # the object's "red" and the background's "red" are the same token unless the role is flagged
    assert torch.equal(tokens[1], tokens[-1]) != roles
    assert tokens[-1, ablate.ROLE_FLAG] == (ablate.ONEHOT_SCALE if roles else 0)
    assert torch.allclose(pooled, tokens.sum(0) / 3.0)  # a bag of words: 9 tokens, sqrt(9)
    assert ablate.TOKENS["words-roles" if roles else "words"].max_tokens == ablate.WORD_TOKENS


def test_words_nopool_is_the_word_tokens_with_a_zero_pooled_vector():
    attrs = {"objects": [{"shape": "star", "colour": "red", "position": "top left", "size": "large"}],
             "background": "gray"}
    tokens, pooled = ablate.TOKENS["words-nopool"].make(attrs, 32)
    words, words_pooled = ablate.word_tokens(attrs, 32, roles=False)
    assert torch.equal(tokens, words) and words_pooled.any()
    assert pooled.shape == (32,) and not pooled.any()


def test_onehot_dataset_reaches_the_trainer_batches(tiny_model_dir, tiny_data_dir, tmp_path):
    out = ablate.write_token_dataset(tiny_model_dir, tiny_data_dir, tmp_path / "onehot", conditioning="onehot",
                                     resolution=64)
    layout = json.loads((out / "buckets.json").read_text())
    assert layout["kind"] == "precomputed" and layout["precompute"]["max_text_tokens"] == ablate.ONEHOT_TOKENS
    loader = build_loader(DataConfig(local=str(out), resolution=64, shuffle=False), batch_size=4)
    batch = next(iter(loader))
    src = open_mds(tiny_data_dir)
    vae = load_vae(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    for i, caption in enumerate(batch["caption"]):  # one bucket, unshuffled: the source's order
        row = src[i]
        assert caption == row["caption"]
        attrs = row["attributes"]
        want, pooled = ablate.onehot_tokens(attrs, 32)
        n = len(want)
        assert batch["t5_mask"][i].sum() == n
        assert torch.equal(batch["t5"][i, :n].float(), want) and torch.equal(batch["pooled"][i].float(), pooled)
        pixels = to_tensor([Image.open(io.BytesIO(row["image"])).convert("RGB")])
        mean = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        # the writer encodes 64 images per call: batched convolutions round differently from this single image's
        torch.testing.assert_close(batch["latent_mean"][i].float(), mean[0], atol=1e-4, rtol=1e-4)
    empty = load_file(str(out / "empty_prompt.safetensors"))  # caption dropout's input: no attribute at all
    assert empty["t5"].shape == (1, 32) and not empty["t5"].any() and not empty["pooled"].any()


@pytest.mark.parametrize("conditioning", ["t5-only", "pooled-only", "text-mean", "text-nofill"])
def test_text_part_dataset_is_the_encoders_output_less_one_part(tiny_model_dir, tiny_data_dir, tmp_path, conditioning):
    """The trainer's batches hold each caption's own T5 states and CLIP pooled vector (as the text encoders give them
    for that caption alone), with the other part zeroed; the posterior's std is kept, so latents are drawn as on the
    raw path; the empty prompt (caption dropout) loses the same part. `text-mean` keeps both parts and drops the std:
    the text run on the posterior's mean. `text-nofill` keeps both parts of the caption's attribute words alone."""
    out = ablate.write_token_dataset(tiny_model_dir, tiny_data_dir, tmp_path / conditioning,
                                     conditioning=conditioning, resolution=64, text_tokens=64)
    layout = json.loads((out / "buckets.json").read_text())
    t5_only, both = conditioning == "t5-only", conditioning in ("text-mean", "text-nofill")
    view = ablate.CAPTION_VIEWS.get(conditioning, str)
    assert layout["precompute"]["latents"] == ("mean" if conditioning == "text-mean" else "dist")
    assert layout["precompute"]["conditioning"] == conditioning
    assert layout["precompute"]["max_text_tokens"] == (1 if conditioning == "pooled-only" else 64)
    batch = next(iter(build_loader(DataConfig(local=str(out), resolution=64, shuffle=False), batch_size=4)))
    assert ("latent_std" in batch) == (conditioning != "text-mean")
    text = TextEncoder(tiny_model_dir, dtype=torch.float32, device=torch.device("cpu"))
    for i, caption in enumerate(batch["caption"]):
        e = text.encode([view(caption)], max_tokens=64, masked=True)
        n = int(batch["t5_mask"][i].sum())
        if t5_only or both:
            assert n == e.lengths[0]
            torch.testing.assert_close(batch["t5"][i, :n].float(), e.t5[0, :n], atol=1e-5, rtol=1e-5)
            if both:
                torch.testing.assert_close(batch["pooled"][i].float(), e.pooled[0], atol=1e-5, rtol=1e-5)
            else:
                assert not batch["pooled"][i].any()
        else:
            assert n == 1 and not batch["t5"][i, :1].any()
            torch.testing.assert_close(batch["pooled"][i].float(), e.pooled[0], atol=1e-5, rtol=1e-5)
    empty, e = load_file(str(out / "empty_prompt.safetensors")), text.encode([""], max_tokens=64, masked=True)
    if both:
        torch.testing.assert_close(empty["t5"], e.t5[0, :e.lengths[0]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(empty["pooled"], e.pooled[0], atol=1e-5, rtol=1e-5)
    elif t5_only:
        torch.testing.assert_close(empty["t5"], e.t5[0, :e.lengths[0]], atol=1e-5, rtol=1e-5)
        assert not empty["pooled"].any()
    else:
        assert empty["t5"].shape == (1, 32) and not empty["t5"].any()
        torch.testing.assert_close(empty["pooled"], e.pooled[0], atol=1e-5, rtol=1e-5)


def test_attribute_words_keep_every_attribute_and_no_filler():
    """`text-nofill`'s view of a caption: every attribute word of the world's captions, in order, "background" kept
    (the colour word before it names the background), no article, preposition, prefix or adjective."""
    assert ablate.attribute_words("a simple drawing of a small bright red circle at the top left, a blue star and "
                                  "a green ring on a white background") == \
        "small red circle top left blue star green ring white background"
    for _, _, caption, attrs in iter_samples(200, size=8, seed=3):
        words = ablate.attribute_words(caption).split()
        obj = attrs["objects"][0]
        assert obj["shape"] in words and obj["colour"] in words
        assert not set(words) & {"a", "an", "the", "of", "at", "on", "and", "simple", "image", "picture", "drawing"}


@pytest.mark.parametrize("conditioning", ["t5-only", "pooled-only"])
def test_text_part_sampling_reads_only_its_part(tiny_model_dir, conditioning):
    """With one part zeroed, the embedder of the other part only adds its bias: changing that embedder's weights
    leaves every image as it was (with real CFG, so the empty prompt's branch too), while full-text sampling does
    change. The part that is kept still reaches the model: two prompts give different images."""
    m = load_model(tiny_model_dir)
    prompts = ["a small red circle at the top left", "a large blue square at the bottom right"]
    s = SamplingSettings(steps=2, cfg_scale=3.0, resolution=64, seed=5, max_text_tokens=64)
    zeroed = (m.transformer.time_text_embed.text_embedder.linear_1 if conditioning == "t5-only"
              else m.transformer.context_embedder)
    part = lambda: to_tensor(ablate.sample_text_part(m, prompts, s, conditioning))  # noqa: E731
    full = lambda: to_tensor(generate(m.transformer, m.vae, m.text, prompts, s, dtype=m.dtype))  # noqa: E731
    before_part, before_full = part(), full()
    assert not torch.equal(before_part[0], before_part[1])
    with torch.no_grad():
        zeroed.weight.mul_(-2.0)
    assert torch.equal(part(), before_part)
    assert not torch.equal(full(), before_full)


@pytest.mark.parametrize("conditioning", ["onehot", "text", "words", "pooled-only"])
def test_driver_trains_and_reads_every_checkpoint(tmp_path, conditioning):
    """The text run in the split-palette one-object world with the toy text encoders (`text.*`, docs/proof.md's text
    runs), the others in the default world and the tiny model's encoders."""
    world = ["world.palettes=split", "world.objects=[1]"] if conditioning == "text" else []
    if conditioning == "text":
        world += ["text.width=64", "text.clip_width=48", "text.mixing=false", "text.state_norm=3"]
    cfg = load_proof_config(None, smoke=True, overrides=[f"out_dir={tmp_path / 'abl'}", "teacher.steps=2", *world])
    rows = ablate.run_ablation(cfg, conditioning=conditioning, every=1)
    assert [(r["step"], r["cfg"]) for r in rows] == [(s, c) for s in (1, 2) for c in cfg.eval.cfg_scales]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("mean", "shape", "colour", "position", "size", "background"))
    out = tmp_path / "abl-smoke"
    assert json.loads((out / f"curves_{conditioning}.json").read_text()) == rows
    assert (out / f"curves_{conditioning}.md").read_text().count("\n") == 2 + len(rows)
    data = out / f"{conditioning}_data"
    assert data.is_dir() == (conditioning != "text")  # the text teacher trains on the world's own shards
    if world:  # the world stage drew it, and the stages that read the world recorded it
        ds = LocalDataset(local=str(out / "data"))
        assert all(len(ds[i]["attributes"]["objects"]) == 1 for i in range(len(ds)))
        stages = json.loads((out / "stages.json").read_text())
        assert stages["vae"]["world"] == {"objects": [1], "palettes": "split"} == stages["teacher"]["world"]["world"]
        assert stages["pipeline"]["text"] == {"width": 64, "clip_width": 48, "mixing": False, "state_norm": 3.0}
        pipeline = json.loads((out / "pipeline" / "transformer" / "config.json").read_text())
        t5 = json.loads((out / "pipeline" / "text_encoder_2" / "config.json").read_text())
        assert pipeline["joint_attention_dim"] == t5["d_model"] == 64 and pipeline["pooled_projection_dim"] == 48
    if conditioning == "words":  # the writer wrote word tokens, as many as the world's captions have words
        layout = json.loads((data / "buckets.json").read_text())
        assert layout["precompute"]["max_text_tokens"] == ablate.WORD_TOKENS
        assert layout["precompute"]["conditioning"] == "words-attributes"
    with pytest.raises(ValueError, match="--conditioning: 'pooled'"):
        ablate.run_ablation(cfg, conditioning="pooled", every=1)


def test_driver_resumes_a_teacher_stopped_before_its_steps(tmp_path):
    """A teacher run that holds checkpoints short of teacher.steps (a stopped or lost session; here one trained to 2
    of now 3 steps) is trained on from its latest checkpoint, not read as finished."""
    over = [f"out_dir={tmp_path / 'abl'}"]
    ablate.run_ablation(load_proof_config(None, smoke=True, overrides=[*over, "teacher.steps=2"]),
                        conditioning="onehot", every=1)
    ckpts = tmp_path / "abl-smoke" / "teacher_onehot" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    cfg = load_proof_config(None, smoke=True, overrides=[*over, "teacher.steps=3"])
    rows = ablate.run_ablation(cfg, conditioning="onehot", every=1)
    assert [(r["step"], r["cfg"]) for r in rows] == [(s, c) for s in (1, 2, 3) for c in cfg.eval.cfg_scales]
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir() if p.name in before} == before  # resumed


def test_colour_roles_counts_each_role_against_the_prompt(tmp_path):
    """On the smoke world's untrained pipeline: the fractions equal the judge's readings of the same images compared
    with each prompt's object colour and background, by hand."""
    cfg = load_proof_config(None, smoke=True, overrides=[f"out_dir={tmp_path / 'abl'}", "eval.repeats=1"])
    run(cfg, until="vae")
    out = tmp_path / "abl-smoke"
    judge, world = load_judge(out / "judge.safetensors"), held_out_world(cfg)
    got = ablate.colour_roles(cfg, out / "pipeline", judge, world, cfg_scale=2.0)
    m = load_model(out / "pipeline")
    s = SamplingSettings(steps=max(cfg.eval.steps), cfg_scale=2.0, resolution=cfg.resolution, seed=100_000,
                         max_text_tokens=cfg.max_text_tokens, batch_size=256)
    _, preds = judge_images(judge, to_tensor(generate(m.transformer, m.vae, m.text, world["eval_prompts"], s,
                                                      dtype=m.dtype)))
    n = len(world["eval"])
    objs = [a["objects"][0]["colour"] for _, a in world["eval"]]
    bgs = [a["background"] for _, a in world["eval"]]
    colours = sorted(COLOURS)
    want = {"colour_right": sum(colours[p] == o for p, o in zip(preds["colour"], objs)) / n,
            "colour_swapped": sum(colours[p] == b for p, b in zip(preds["colour"], bgs)) / n,
            "background_right": sum(colours[p] == b for p, b in zip(preds["background"], bgs)) / n,
            "background_swapped": sum(colours[p] == o for p, o in zip(preds["background"], objs)) / n}
    assert got == pytest.approx(want)


def test_nofill_samples_the_attribute_words(tiny_model_dir):
    """`text-nofill` samples as `evals.sampler.generate` does on the prompts' attribute words (same noise, same
    empty-prompt branch), not on the prompts."""
    m = load_model(tiny_model_dir)
    prompts = ["an image of a small red circle at the top left",
               "a large blue square at the bottom on a black background"]
    s = SamplingSettings(steps=2, cfg_scale=3.0, resolution=64, seed=5, max_text_tokens=64)
    nofill = to_tensor(ablate.sample_text_part(m, prompts, s, "text-nofill"))
    words = [ablate.attribute_words(p) for p in prompts]
    assert torch.equal(nofill, to_tensor(generate(m.transformer, m.vae, m.text, words, s, dtype=m.dtype)))
    assert not torch.equal(nofill, to_tensor(generate(m.transformer, m.vae, m.text, prompts, s, dtype=m.dtype)))
