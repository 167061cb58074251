"""Random eval assets in the real formats, so tests and the demo run the real FID and CLIP-score code offline.

- `write_random_inception(path, seed)`: FID Inception weights (random) in the safetensors layout that
  `evals.inception.load_inception` reads, i.e. pytorch-fid's key naming.
- `write_tiny_clip(path, seed)`: a tiny random `CLIPModel` dir with tokenizer and image processor, loadable by
  `transformers` like a downloaded `openai/clip-vit-large-patch14`.
- `write_eval_assets(model_dir)`: both, under `model_dir/eval/` (the tiny-model maker calls it).

The numbers these produce mean nothing; the code paths they exercise are the ones real weights take.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """He-initialised convs (activations keep their scale through 40+ layers), near-identity BatchNorm."""
    from evals.inception import FIDInceptionV3  # deferred: it imports torchvision's Inception (~2 s)

    path = Path(path)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = FIDInceptionV3()
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # BatchNorm step counters hold no weights; load_inception accepts files with or without them
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = math.prod(t.shape[1:])
            v = torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif name.endswith("running_var"):
            v = 1.0 + 0.1 * torch.rand(t.shape, generator=g)
        elif name.endswith("bn.weight"):
            v = 1.0 + 0.05 * torch.randn(t.shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            v = 0.05 * torch.randn(t.shape, generator=g)
        state[name] = v.float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})  # one key: safetensors orders metadata by hash
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character map (ASCII letters map to themselves). Our own copy:
    transformers 5 no longer has tokenization_clip.bytes_to_unicode."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_char_clip_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE (every byte, with and without the end-of-word mark, no merges): a valid CLIP
    vocabulary that needs no training. Returns the vocabulary size."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(tokens)


def write_tiny_clip(path: str | Path, seed: int = 0, *, tokenizer_dir: str | Path | None = None) -> Path:
    """A tiny random CLIP (2-layer text and vision towers, 32-px images) in Hugging Face layout.

    `tokenizer_dir`: a CLIP tokenizer to reuse (the tiny FLUX model's `tokenizer/`, whose BPE knows the tiny-data
    words); without it, a character-level one.
    """
    # deferred: transformers takes seconds to import, and only the tiny CLIP needs it
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_length = 77
    if tokenizer_dir is not None:
        tokenizer = CLIPTokenizerFast.from_pretrained(str(tokenizer_dir), model_max_length=max_length)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _write_char_clip_tokenizer(Path(tmp))
            # from the folder (transformers 5's tokenizer classes take the vocabulary itself, not vocab_file)
            tokenizer = CLIPTokenizerFast.from_pretrained(tmp, model_max_length=max_length, pad_token="<|endoftext|>")
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG; leave it untouched
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    with torch.no_grad():
        # Random towers give cosines scattered around 0, which the clamp of the score turns into a flat 0. A shared
        # direction in both embeddings (LayerNorm bias 1, a rank-1 term on projection row 0) centres the cosines near
        # 0.5 and leaves them varying with image and caption, so tiny-model reports show numbers that move.
        for norm, proj in ((model.vision_model.post_layernorm, model.visual_projection),
                           (model.text_model.final_layer_norm, model.text_projection)):
            norm.bias.fill_(1.0)
            proj.weight[0] += 6.0 / norm.bias.numel()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(path, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def write_eval_assets(model_dir: str | Path, seed: int = 0) -> Path:
    """`model_dir/eval/inception.safetensors` and `model_dir/eval/clip/` (what configs/evals/tiny.yaml points at)."""
    out = Path(model_dir) / "eval"
    write_random_inception(out / "inception.safetensors", seed=seed)
    tokenizer = Path(model_dir) / "tokenizer"
    write_tiny_clip(out / "clip", seed=seed, tokenizer_dir=tokenizer if (tokenizer / "vocab.json").is_file() else None)
    return out

