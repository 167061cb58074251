"""The tiny FLUX pipeline: diffusers loads and runs it, its tokenizers know the caption words, it is deterministic."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dataset_tools.tiny_data import caption_vocabulary
from dataset_tools.tiny_model import write_tiny_model

CAPTION = "a small blue square at the top left on a yellow background"


def test_flux_pipeline_loads_and_generates(tiny_model_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_model_dir))
    assert pipe.vae_scale_factor == 8  # like FLUX: 64 px -> 8x8 latents -> 16 packed tokens
    assert pipe.transformer.config.guidance_embeds is False  # like schnell

    def run(seed):
        return pipe(
            CAPTION, height=64, width=64, num_inference_steps=2, max_sequence_length=64, output_type="np",
            generator=torch.Generator().manual_seed(seed),
        ).images[0]

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (64, 64, 3)
    assert a.std() > 0.01  # not a constant image: the random weights do something
    assert (a == b).all() and not (a == c).all()

    (img,) = pipe(CAPTION, height=64, width=64, num_inference_steps=2, max_sequence_length=64).images
    assert img.size == (64, 64)


def test_clip_tokenizer_knows_every_caption_word(tiny_model_dir):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow = CLIPTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    fast = CLIPTokenizerFast.from_pretrained(str(tiny_model_dir / "tokenizer"))
    for word in caption_vocabulary():
        assert slow.tokenize(word) == [word + "</w>"], word
    ids = slow(CAPTION).input_ids
    assert ids == fast(CAPTION).input_ids
    assert ids[0] == slow.bos_token_id and ids[-1] == slow.eos_token_id
    assert len(ids) == len(CAPTION.split()) + 2  # one token per word, no unk fallback to characters
    assert slow.model_max_length == 77 and slow.pad_token == "<|endoftext|>"

    cfg = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    assert cfg["vocab_size"] >= len(slow)
    assert cfg["eos_token_id"] == slow.eos_token_id  # CLIP pools at the first eos: must be the tokenizer's


def test_t5_tokenizer_pads_with_0_and_appends_eos(tiny_model_dir):
    from transformers import T5Tokenizer, T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(tiny_model_dir / "tokenizer_2"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for word in caption_vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word

    batch = tok(["a red circle", CAPTION], padding="max_length", max_length=32).input_ids
    short = batch[0]
    assert short[3] == tok.eos_token_id and set(short[4:]) == {0}  # 3 words, </s>, then <pad> = 0
    long = [i for i in batch[1] if i != 0]
    assert long[-1] == tok.eos_token_id and tok.unk_token_id not in long
    assert len(long) == len(CAPTION.split()) + 1
    # The slow tokenizer (same spiece.model) agrees, including the "▁" before the first word.
    assert T5Tokenizer.from_pretrained(str(tiny_model_dir / "tokenizer_2"))(CAPTION).input_ids == tok(CAPTION).input_ids

    cfg = json.loads((tiny_model_dir / "text_encoder_2" / "config.json").read_text())
    assert cfg["vocab_size"] >= len(tok) and cfg["d_model"] == 32


def test_same_seed_same_files_other_seed_other_weights(tiny_model_dir, tmp_path):
    again = tmp_path / "again"
    again.mkdir()  # an existing empty directory is fine
    write_tiny_model(again, seed=0)
    files = sorted(p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (tiny_model_dir / f).read_bytes() == (again / f).read_bytes(), f

    other = write_tiny_model(tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    w0, w1 = load_file(tiny_model_dir / name), load_file(other / name)
    assert w0.keys() == w1.keys()
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)


def test_refuses_non_empty_dir_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty") as e:
        write_tiny_model(out)
    assert str(out) in str(e.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    with pytest.raises(ValueError, match="size"):
        write_tiny_model(tmp_path / "bad", size="huge")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-written dir, no temp dir left


def test_cast_model_is_quiet_and_keeps_fp32_modules(caplog):
    """`dedistill export` casts the merged transformer to bf16: diffusers' ModelMixin.to would log "There are modules
    ... that should be kept in float32: []" on every cast; cast_model does not, and honours a non-empty list.
    (Read from the log records, not stderr: diffusers' handler holds whichever stderr existed when it was made, which
    under pytest can be an earlier test's capture.)"""
    import logging

    from tiny_nets import tiny_transformer
    from train.model import cast_model

    caplog.set_level(logging.WARNING, logger="diffusers")
    m = cast_model(tiny_transformer(), torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    m._keep_in_fp32_modules = ["norm_out"]
    cast_model(m, torch.bfloat16)
    assert {p.dtype for n, p in m.named_parameters() if n.startswith("norm_out.")} == {torch.float32}
    assert {p.dtype for n, p in m.named_parameters() if not n.startswith("norm_out.")} == {torch.bfloat16}
    assert "kept in float32" not in caplog.text
    tiny_transformer().to(torch.bfloat16)  # what it replaces: the message this test would see
    assert "kept in float32" in caplog.text


def _t5_states(pipe, captions):
    tok = pipe.tokenizer_2(captions, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        return tok.input_ids, pipe.text_encoder_2(tok.input_ids).last_hidden_state


def test_toy_text_option_gives_each_word_its_own_state_through_diffusers(tmp_path):
    """ToyText (the toy proof's `text:`): a wider T5 without mixing, with orthogonal embeddings, gives a word the same
    state, of the asked norm, whatever its neighbours, and two words orthogonal states, in files FluxPipeline loads and
    samples from; the tiny model's T5 mixes."""
    from diffusers import FluxPipeline

    from dataset_tools.tiny_model import ToyText, build_tiny_pipeline

    text = ToyText(width=256, clip_width=64, mixing=False, clip_mixing=False, orthogonal=True, state_norm=3.0)
    build_tiny_pipeline(tmp_path / "tok", seed=0, text=text).save_pretrained(str(tmp_path / "toy"))
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "toy"))
    assert pipe.transformer.config.joint_attention_dim == 256 == pipe.text_encoder_2.config.d_model
    assert pipe.text_encoder_2.config.d_kv == 8  # inert blocks keep the tiny widths: the smallest files
    assert pipe.transformer.config.pooled_projection_dim == 64 == pipe.text_encoder.config.hidden_size
    captions = ["a small red circle at the top", "an image of a blue circle on a black background"]
    ids, states = _t5_states(pipe, captions)
    word = pipe.tokenizer_2.convert_tokens_to_ids
    a, b = (states[i][ids[i] == word("▁circle")][0] for i in range(2))
    torch.testing.assert_close(a, b)
    red = states[0][ids[0] == word("▁red")][0]
    assert abs(float(a @ red)) < 1e-4
    torch.testing.assert_close(states.norm(dim=-1), torch.full(states.shape[:2], 3.0))
    # CLIP without mixing: the pooled vector (the end-of-text token's state) is the same for two captions of one length
    same_length = ["a small red circle at the top", "a large blue square at the left"]
    clip_ids = pipe.tokenizer(same_length, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = pipe.text_encoder(clip_ids).pooler_output
    torch.testing.assert_close(pooled[0], pooled[1])
    image = pipe(captions[0], height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()

    mixed = build_tiny_pipeline(tmp_path / "tok2", seed=0)
    ids, states = _t5_states(mixed, captions)
    a, b = (states[i][ids[i] == word("▁circle")][0] for i in range(2))
    assert (a - b).norm() > 0.1 * a.norm()  # the random two-layer T5 mixes its neighbours in
    assert mixed.text_encoder_2.config.d_model == 32
    clip_ids = mixed.tokenizer(same_length, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = mixed.text_encoder(clip_ids).pooler_output
    assert (pooled[0] - pooled[1]).norm() > 0.1 * pooled[0].norm()


def test_toy_text_option_refuses_bad_settings_by_key(tmp_path):
    from dataset_tools.tiny_model import ToyText, build_tiny_pipeline

    with pytest.raises(ValueError, match="^text.width: 30 must"):
        ToyText(width=30)
    with pytest.raises(ValueError, match="^text.clip_width: 6 must"):
        ToyText(clip_width=6)
    with pytest.raises(ValueError, match="^text.state_norm"):
        ToyText(state_norm=0)
    with pytest.raises(ValueError, match="^--family"):
        build_tiny_pipeline(tmp_path / "a", family="chroma", text=ToyText(mixing=False))
    with pytest.raises(ValueError, match=r"^text.orthogonal: 216 token embeddings cannot be orthogonal in width 128"):
        build_tiny_pipeline(tmp_path / "b", text=ToyText(width=128, orthogonal=True))
