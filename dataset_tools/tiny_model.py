"""A tiny random FLUX (or Chroma) pipeline in diffusers layout, built locally (no hub): what the demo and the tests
train.

Same component classes and file layout as FLUX.1-schnell, so every code path (loading, packing, masking, sampling,
export) is the real one; only the widths are tiny. The tokenizers are trained here on the caption vocabulary of
`dataset_tools.tiny_data`, so every word of a tiny-data caption is a real token (not <unk>).

Choices worth knowing:
- Transformer: like schnell, no guidance embedding (family flux-dev: with one, as FLUX.1-dev). in_channels = 16 =
  VAE latent channels (4) x 2x2 packing.
- VAE: four blocks, i.e. 8x downsampling like FLUX's VAE, so the `H / 8 / 2` latent and packing arithmetic is the
  real one (a 64 px image -> 8x8x4 latents -> 16 image tokens). Heights and widths must be multiples of 16.
  FLUX's scaling/shift factors and no quant convs, as in FLUX.
- Scheduler: FLUX.1-schnell's own config (FlowMatchEulerDiscreteScheduler, shift 1.0, no dynamic shifting), as
  everything else here mirrors schnell. A de-distilled model samples with FLUX.1-dev's dynamic shift instead: its run
  records that (`sample.schedule`) and its export's scheduler config says so.
- Weights are PyTorch/diffusers default random init, seeded per component: the same seed gives identical files.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import regex
import sentencepiece as spm
import torch

from dataset_tools.seeding import seeded
from dataset_tools.tiny_data import (
    COLOURS, POSITIONS, SHAPES, SIZES, caption_vocabulary, draw_sample,
)
from dataset_tools.tiny_model_flux2 import build_flux2_pipeline
from evals.assets import bytes_to_unicode, write_eval_assets
from train.outputs import atomic_output_dir

# Model sizes: a registry, so a second size is one entry, not a new branch.
TINY_SIZES: dict[str, dict[str, dict]] = {
    "tiny": {
        "transformer": dict(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        # CLIP's pooled output (width hidden_size) feeds the transformer's pooled projection.
        "clip": dict(hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=77),
        # T5's d_model is the transformer's joint_attention_dim. Gated-GELU like the T5 v1.1 encoder FLUX uses.
        "t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                   dropout_rate=0.0),
    },
    # FLUX.1's exact interface widths (hidden 3072 = 24 heads x 128, rope axes (16, 56, 56), T5 width 4096, CLIP
    # pooled 768, in_channels 64 = 16 latent channels x 2x2) with one block of each kind: 0.54B parameters that catch
    # the shape, rope and width bugs tiny dims hide. The encoders keep FLUX's output widths but are otherwise tiny
    # (a full-width test trains on precomputed states and never runs them).
    "full-width": {
        "transformer": dict(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        "clip": dict(hidden_size=768, projection_dim=768, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=77),
        "t5": dict(d_model=4096, d_kv=8, d_ff=37, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                   dropout_rate=0.0),
    },
    # A mid-size FLUX for load/memory/checkpoint benchmarks (bench/): 0.64B transformer parameters at FLUX's
    # head width (12 heads x 128, 4 double + 8 single blocks), FLUX.1's VAE architecture (84M), a one-layer T5 at
    # FLUX's width (0.19B) and a two-layer CLIP-L.
    "mid": {
        "transformer": dict(
            patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
            num_attention_heads=12, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        ),
        "clip": dict(hidden_size=768, projection_dim=768, num_hidden_layers=2, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=77),
        "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                   dropout_rate=0.0),
    },
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SCHEDULER_CONFIG = dict(  # FLUX.1-schnell's scheduler/scheduler_config.json
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

# Words beyond the captions, so ordinary prompts (and negative prompts) are not all <unk>.
COMMON_WORDS: tuple[str, ...] = (
    "photo", "picture", "painting", "drawing", "image", "of", "a", "an", "the", "and", "with", "in", "on", "at", "is",
    "it", "to", "by", "for", "from", "this", "that", "very", "high", "low", "quality", "blurry", "detailed", "sharp",
    "dark", "light", "bright", "colour", "color", "shape", "shapes", "object", "objects", "big", "tiny", "two",
    "three", "one", "many", "some", "no", "not", "side", "middle", "corner", "above", "below", "next", "near",
    "inside", "outside", "between", "behind", "front", "under", "over", "round", "flat", "solid", "empty", "filled",
    "outline", "line", "lines", "edge", "pattern", "grid", "noise", "noisy", "pixel", "watermark", "signature",
    "ugly", "bad", "good", "beautiful", "realistic", "cartoon", "deformed", "distorted", "dog", "cat", "person",
    "man", "woman", "house", "tree", "flower", "car", "city", "mountain", "sky", "water", "text", "art", "style",
    "portrait", "landscape", "background",
)
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_T5_VOCAB = 256  # sentencepiece target, a soft limit on this small corpus
_T5_REQUIRED_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&+%"


def tokenizer_corpus(n_captions: int = 2000) -> list[str]:
    """Fixed (seed-independent) training text: tiny-data captions, the word lists, common words."""
    rng = random.Random("tokenizer-corpus")
    lines = [draw_sample(rng, 8)[1] for _ in range(n_captions)]
    # Every word also in two short phrases: the unigram trainer seeds pieces from substrings repeated in varied
    # contexts, and without these many words (even "background") end up as character pieces. Checked by a test.
    words = sorted(set(caption_vocabulary()) | set(COMMON_WORDS))
    lines += [f"the {w}" for w in words] * 3 + [f"{w} and" for w in words] * 3
    lines += [f"{c} {s} {z} {p}" for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS][::7]
    return lines


# ---------------------------------------------------------------------------------------------------------- tokenizers


def train_bpe_merges(corpus: list[str], *, max_merges: int = 1000) -> list[tuple[str, str]]:
    """CLIP-style BPE merges (words split as CLIP does, "</w>" on the last symbol), most frequent pair first.

    Not `tokenizers.trainers.BpeTrainer`: it breaks count ties in hash order, so two runs gave different merges
    (and possibly different vocabularies). Here ties go to the lexicographically smallest pair: same corpus, same
    files. Stops when every corpus word is a single token.
    """
    byte_map = bytes_to_unicode()
    counts: Counter[str] = Counter()
    for line in corpus:
        for word in regex.findall(_CLIP_PATTERN, line.lower()):
            counts["".join(byte_map[b] for b in word.encode("utf-8"))] += 1
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, sym in splits.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, sym in splits.items():
            out, i = [], 0
            while i < len(sym):
                if sym[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            splits[w] = tuple(out)
    return merges


def write_clip_tokenizer(folder: Path, corpus: list[str]) -> "CLIPTokenizer":  # noqa: F821
    """CLIP's files (vocab.json, merges.txt); vocabulary laid out as CLIP's: bytes, bytes</w>, merges, specials."""
    # deferred: transformers takes seconds to import; only building the tiny model needs it
    from transformers import CLIPTokenizer

    merges = train_bpe_merges(corpus)
    base = list(bytes_to_unicode().values())
    # dict.fromkeys: two merge paths can build the same string ("a bc", "ab c"); it gets one id.
    tokens = list(dict.fromkeys(base + [b + "</w>" for b in base] + [a + b for a, b in merges])) + [CLIP_BOS, CLIP_EOS]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # FLUX's CLIP tokenizer pads with <|endoftext|>; CLIP pools at the first <|endoftext|>. Loaded from the folder,
    # not built from the file paths: transformers 5's CLIPTokenizer takes the vocabulary itself, not vocab_file.
    return CLIPTokenizer.from_pretrained(
        str(folder), unk_token=CLIP_EOS, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
        model_max_length=77,
    )


def write_t5_tokenizer(folder: Path, corpus: list[str]) -> "T5TokenizerFast":  # noqa: F821
    """Train a sentencepiece unigram model with T5's special ids: <pad> 0, </s> 1, <unk> 2, no <s>."""
    from transformers import T5TokenizerFast  # deferred: seconds to import; only the tiny model needs it

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram", vocab_size=_T5_VOCAB,
        hard_vocab_limit=False, character_coverage=1.0, required_chars=_T5_REQUIRED_CHARS,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, minloglevel=2,  # one thread: training is then deterministic
    )
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    # add_prefix_space: "▁" before the first word too, as the slow T5Tokenizer and FLUX's tokenizer_2 do (left unset,
    # converting from spiece.model here would give prepend_scheme="never").
    with _quiet_transformers():
        tok = T5TokenizerFast(vocab_file=str(folder / "spiece.model"), extra_ids=0, model_max_length=512,
                              legacy=True, add_prefix_space=True)
    # The saved tokenizer.json already prepends "▁"; kept in the config, the flag would make every load re-convert
    # from spiece.model.
    tok.init_kwargs.pop("add_prefix_space", None)
    return tok


@contextlib.contextmanager
def _quiet_transformers():
    # deferred: transformers takes seconds to import; only building the tiny model needs it
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# -------------------------------------------------------------------------------------------------------------- models


# Chroma's approximator (the MLP that emits every modulation vector) per size: (input channels = 4 x the timestep
# embedding width, hidden, layers). Chroma's own is (64, 5120, 5); the tiny one keeps its shape at toy widths.
CHROMA_APPROXIMATOR: dict[str, tuple[int, int, int]] = {"tiny": (16, 32, 2), "full-width": (64, 5120, 5),
                                                         "mid": (64, 1024, 2)}


def chroma_transformer_dims(size: str) -> dict:
    """The size's FLUX transformer dims as a ChromaTransformer2DModel's: no pooled projection or guidance embedding
    (pruned), the approximator instead."""
    dims = {k: v for k, v in TINY_SIZES[size]["transformer"].items()
            if k not in ("pooled_projection_dim", "guidance_embeds")}
    channels, hidden, layers = CHROMA_APPROXIMATOR[size]
    return {**dims, "approximator_num_channels": channels, "approximator_hidden_dim": hidden,
            "approximator_layers": layers}


@dataclass(frozen=True, kw_only=True)
class ToyText:
    """The toy's text encoders, where they differ from the size's (the toy proof's `text:`; docs/proof.md).

    A random T5 is not a trained one: its two random layers mix every word into its neighbours, so at the shape word's
    place the state is as much the fillers' as the shape's, and its random embeddings overlap, so words share
    directions. A trained T5's states keep a word's meaning at its place, told apart from the others. These settings
    give the toy that property with the same classes and files (every loader reads them as it reads FLUX's T5 and CLIP):
    - `width`: T5's d_model (the transformer's joint_attention_dim follows; with mixing, the blocks' inner widths
      too); `clip_width`: CLIP's hidden size (the transformer's pooled_projection_dim follows). None keeps the size's.
    - `mixing=False`: T5's blocks keep their shapes but their attention and feed-forward output projections are zero,
      so each residual branch adds nothing and a token's state is its word's embedding, normalised: the same word
      gives the same state in every caption. (transformers' T5 refuses zero layers, so the layer stays, inert.)
    - `clip_mixing=False`: the same for CLIP's layers (attention and MLP output projections zero): its pooled vector,
      the end-of-text token's state, is then that token's embedding at its position, normalised, and says nothing of
      the caption but its length. A random CLIP's pooled vector is a random function of the whole caption, which
      modulates every block; the word tokens that taught shape without it (`ablate --conditioning words-nopool`) say
      the toy does not need it.
    - `orthogonal`: T5's token embeddings are orthonormal (scaled to T5's RMS 1), so no two words share a direction;
      it needs `width` at least the vocabulary size.
    - `state_norm`: each token state's norm (the final RMS norm's gain set to state_norm / sqrt(width)); None keeps
      T5's sqrt(width).
    """

    width: int | None = None
    clip_width: int | None = None
    mixing: bool = True
    clip_mixing: bool = True
    orthogonal: bool = False
    state_norm: float | None = None

    def __post_init__(self) -> None:
        for key in ("width", "clip_width"):
            w = getattr(self, key)
            if w is not None and (w < 8 or w % 4):
                raise ValueError(f"text.{key}: {w} must be a multiple of 4, at least 8")
        if self.state_norm is not None and not self.state_norm > 0:
            raise ValueError(f"text.state_norm: {self.state_norm} must be > 0")

    def dims(self, size: str) -> dict[str, dict]:
        """The size's dims with these text widths: T5, CLIP and the transformer's text inputs."""
        dims = TINY_SIZES[size]
        t5, clip, transformer = dims["t5"], dims["clip"], dims["transformer"]
        if (w := self.width) is not None:
            # Without mixing the blocks add nothing, so their inner widths stay the size's: the smallest files (a
            # 256-wide T5 with blocks to match is 4 MB, over what the shipped toy can carry).
            inner = {"d_kv": w // t5["num_heads"], "d_ff": w + w // 8} if self.mixing else {}
            t5 = {**t5, "d_model": w, **inner}
            transformer = {**transformer, "joint_attention_dim": w}
        if (w := self.clip_width) is not None:
            clip = {**clip, "hidden_size": w, "projection_dim": w, "intermediate_size": w + w // 8}
            transformer = {**transformer, "pooled_projection_dim": w}
        return {**dims, "t5": t5, "clip": clip, "transformer": transformer}

    def apply_clip(self, clip) -> None:
        """`clip_mixing` on a freshly initialised CLIPTextModel."""
        if self.clip_mixing:
            return
        with torch.no_grad():
            for layer in clip.text_model.encoder.layers:
                for out in (layer.self_attn.out_proj, layer.mlp.fc2):
                    out.weight.zero_()
                    out.bias.zero_()

    def apply_t5(self, t5, seed: int) -> None:
        """The weight settings above, on a freshly initialised T5EncoderModel."""
        with torch.no_grad():
            if not self.mixing:
                for block in t5.encoder.block:
                    block.layer[0].SelfAttention.o.weight.zero_()
                    block.layer[1].DenseReluDense.wo.weight.zero_()
            if self.orthogonal:
                vocab, width = t5.shared.weight.shape
                if vocab > width:
                    raise ValueError(f"text.orthogonal: {vocab} token embeddings cannot be orthogonal in width "
                                     f"{width}; set text.width to at least {vocab}")
                g = torch.Generator().manual_seed(seed)
                q, _ = torch.linalg.qr(torch.randn(width, vocab, generator=g, dtype=torch.float64))
                t5.shared.weight.copy_(q.T * width**0.5)
            if self.state_norm is not None:
                t5.encoder.final_layer_norm.weight.fill_(self.state_norm / t5.config.d_model ** 0.5)


def _t5(dims: dict, t5_tok, seed: int, torch_dtype, text: ToyText = ToyText()):
    # deferred: transformers takes seconds to import; only building the tiny model needs it
    from transformers import T5Config, T5EncoderModel

    t5_cfg = T5Config(
        vocab_size=-(-len(t5_tok) // 8) * 8,  # >= len(tokenizer), padded like T5's 32128
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **dims["t5"],
    )
    t5_seed = seed * 16 + 3
    t5 = seeded(t5_seed, lambda: T5EncoderModel(t5_cfg), torch_dtype)
    text.apply_t5(t5, t5_seed)
    return t5


def _clip(clip_cfg, seed: int, torch_dtype, text: ToyText):
    from transformers import CLIPTextModel  # deferred: seconds to import; only building the tiny model needs it

    clip = seeded(seed * 16 + 2, lambda: CLIPTextModel(clip_cfg), torch_dtype)
    text.apply_clip(clip)
    return clip


def _flux_pipeline(tok_dir: Path, corpus: list[str], size: str, seed: int, torch_dtype, *, guidance_embeds=False,
                   text: ToyText = ToyText()):
    # deferred: diffusers and transformers take seconds to import; only building the tiny model needs them
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig

    dims = text.dims(size)
    clip_tok = write_clip_tokenizer(tok_dir / "tokenizer", corpus)
    t5_tok = write_t5_tokenizer(tok_dir / "tokenizer_2", corpus)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id, **dims["clip"],
    )
    # Each component under its own seed: adding a component later does not change the others' weights.
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        transformer=seeded(seed * 16 + 0, lambda: FluxTransformer2DModel(
            **{**dims["transformer"], "guidance_embeds": guidance_embeds}), torch_dtype),
        vae=seeded(seed * 16 + 1, lambda: AutoencoderKL(**dims["vae"]), torch_dtype),
        text_encoder=_clip(clip_cfg, seed, torch_dtype, text),
        text_encoder_2=_t5(dims, t5_tok, seed, torch_dtype, text),
        tokenizer=clip_tok,
        tokenizer_2=t5_tok,
    )


def _chroma_pipeline(tok_dir: Path, corpus: list[str], size: str, seed: int, torch_dtype):
    """ChromaPipeline's layout: T5 and its tokenizer in text_encoder/ and tokenizer/, no CLIP. The VAE and T5 are the
    FLUX tiny model's of the same seed (same seeds, same dims), only the transformer differs."""
    # deferred: diffusers takes seconds to import; only building the tiny model needs it
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    dims = TINY_SIZES[size]
    t5_tok = write_t5_tokenizer(tok_dir / "tokenizer", corpus)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        transformer=seeded(seed * 16 + 0, lambda: ChromaTransformer2DModel(**chroma_transformer_dims(size)),
                            torch_dtype),
        vae=seeded(seed * 16 + 1, lambda: AutoencoderKL(**dims["vae"]), torch_dtype),
        text_encoder=_t5(dims, t5_tok, seed, torch_dtype),
        tokenizer=t5_tok,
    )


# keys: train/family.py's FAMILIES, and flux-dev: FLUX.1-dev-shaped (a guidance embedder, guidance_embeds true)
_PIPELINES = {"flux": _flux_pipeline, "chroma": _chroma_pipeline,
              "flux-dev": partial(_flux_pipeline, guidance_embeds=True),
              "flux2": partial(build_flux2_pipeline, family="flux2"),
              "flux2-klein": partial(build_flux2_pipeline, family="flux2-klein")}


def _check(size: str, dtype: str, family: str) -> None:
    if size not in TINY_SIZES:
        raise ValueError(f"--size: '{size}' is not one of {', '.join(TINY_SIZES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype: '{dtype}' is not one of {', '.join(_DTYPES)}")
    if family not in _PIPELINES:
        raise ValueError(f"--family: '{family}' is not one of {', '.join(_PIPELINES)}")


def build_tiny_pipeline(tok_dir: Path, *, seed: int = 0, size: str = "tiny", dtype: str = "fp32",
                        family: str = "flux", text: ToyText | None = None):
    """The FluxPipeline (or ChromaPipeline) object (tokenizers are trained into `tok_dir`, which must not exist).
    `text` (family flux only) changes the text encoders as ToyText says."""
    _check(size, dtype, family)
    if text is not None and text != ToyText():
        if family != "flux":
            raise ValueError(f"--family: text encoder settings are for family flux, not '{family}'")
        return _flux_pipeline(tok_dir, tokenizer_corpus(), size, seed, _DTYPES[dtype], text=text)
    return _PIPELINES[family](tok_dir, tokenizer_corpus(), size, seed, _DTYPES[dtype])


def write_tiny_model(out_dir: str | Path, *, seed: int = 0, size: str = "tiny", dtype: str = "fp32",
                     family: str = "flux") -> Path:
    """Write a random FLUX pipeline that `FluxPipeline.from_pretrained(out_dir)` loads (family chroma: a Chroma
    pipeline for `ChromaPipeline.from_pretrained`); returns `out_dir`.

    `size` is a TINY_SIZES entry (tiny: the demo and tests; full-width: FLUX.1's widths, 1 + 1 blocks; mid: 0.64B
    for benchmarks); `dtype` the stored weights' dtype (bf16 halves the disk and the time to write).
    Refuses an `out_dir` that exists and is not empty. Written into a temp dir beside it, then renamed, so a reader
    never sees half a model.
    """
    out = Path(out_dir)
    _check(size, dtype, family)  # before anything is written
    with atomic_output_dir(out) as tmp:
        pipe = build_tiny_pipeline(tmp / ".tokenizer-training", seed=seed, size=size, dtype=dtype, family=family)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(tmp / ".tokenizer-training")  # the pipeline saved its own copies
        # OUT_DIR/eval/ (random Inception weights for FID, a tiny CLIP for CLIP score) is written here, into `tmp`,
        # by the evals package, so it lands in the same atomic rename.
        write_eval_assets(tmp, seed=seed)
    return out
