"""Prompt encoding: T5 hidden states with a bool padding mask, and CLIP's pooled vector (FLUX; a Chroma pipeline has
no CLIP, and its pooled vector is (B, 0): the family table says where each encoder lives).

T5 runs *with* its attention mask, so a prompt's states do not depend on how much padding follows it; this is what
makes masked joint attention exact (and trimming a batch to its longest prompt free).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from train.family import family_of_dir
from train.model import check_model_dir


def _h2d(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`; a copy to an accelerator does not wait for it (nothing on the host reads the copy), a copy
    back to the host does (it would be read before it arrived)."""
    return x.to(device, non_blocking=torch.device(device).type != "cpu")


@dataclass
class PromptEmbeds:
    t5: torch.Tensor
    """(B, L, D_t5) T5 hidden states; rows past a prompt's length are padding."""
    mask: torch.Tensor
    """(B, L) bool, True for real tokens (including T5's </s>)."""
    pooled: torch.Tensor
    """(B, D_clip) CLIP pooled output; (B, 0) for a family without CLIP (Chroma)."""
    lengths: tuple[int, ...] | None = None
    """Real tokens per row, known on the host (None: only the mask knows). Trimming and the mask-free attention
    path read these instead of the mask, so neither waits for the GPU. Whoever builds the mask on the host (the
    tokenizer's output in `TextEncoder`, a precomputed batch's collate) passes them; they must match the mask."""

    def __post_init__(self) -> None:
        if self.lengths is not None:
            self.lengths = tuple(int(n) for n in self.lengths)
            assert len(self.lengths) == self.t5.shape[0], "one length per row"

    @staticmethod
    def host_lengths(mask: torch.Tensor) -> tuple[int, ...] | None:
        """The lengths of a (B, L) mask that is on the CPU (None for a device mask: reading it would sync)."""
        return tuple(mask.sum(1).tolist()) if mask.device.type == "cpu" else None

    def __len__(self) -> int:
        return self.t5.shape[0]

    @property
    def unpadded(self) -> bool:
        """True when the host knows that no row has padding left (every length equals L): then the attention mask
        is all True and may be left out, letting SDPA choose its flash kernel, which takes no mask."""
        return self.lengths is not None and all(n == self.t5.shape[1] for n in self.lengths)

    def select(self, index: torch.Tensor) -> "PromptEmbeds":
        lengths = None
        if self.lengths is not None and index.device.type == "cpu":
            lengths = tuple(self.lengths[i] for i in index.tolist())
        index = _h2d(index, self.t5.device)
        return PromptEmbeds(self.t5[index], self.mask[index], self.pooled[index], lengths)

    def where(self, replace: torch.Tensor, other: "PromptEmbeds") -> "PromptEmbeds":
        """Rows where `replace` (B,) is True come from `other` (one row, broadcast), e.g. the empty prompt."""
        other = other.pad_to(self.t5.shape[1])
        lengths = None
        if self.lengths is not None and other.lengths is not None and replace.device.type == "cpu":
            lengths = tuple(other.lengths[0] if r else n for r, n in zip(replace.tolist(), self.lengths))
        r = _h2d(replace, self.t5.device)
        return PromptEmbeds(
            torch.where(r[:, None, None], other.t5.expand_as(self.t5), self.t5),
            torch.where(r[:, None], other.mask.expand_as(self.mask), self.mask),
            torch.where(r[:, None], other.pooled.expand_as(self.pooled), self.pooled),
            lengths,
        )

    def pad_to(self, length: int) -> "PromptEmbeds":
        n = self.t5.shape[1]
        if n == length:
            return self
        if n > length:
            if self.lengths is not None:
                assert max(self.lengths) <= length, "truncating real tokens"
            else:
                assert not self.mask[:, length:].any(), "truncating real tokens"
            return PromptEmbeds(self.t5[:, :length], self.mask[:, :length], self.pooled, self.lengths)
        pad = length - n
        return PromptEmbeds(
            torch.nn.functional.pad(self.t5, (0, 0, 0, pad)),
            torch.nn.functional.pad(self.mask, (0, pad), value=False),
            self.pooled,
            self.lengths,
        )

    def trimmed(self) -> "PromptEmbeds":
        """Drop trailing columns that are padding in every row (exact only with masked attention)."""
        if self.lengths is not None:
            longest = max(self.lengths, default=1)
        else:  # a device sync: only when the host does not know the lengths
            longest = int(self.mask.sum(1).max().item()) if self.mask.numel() else 1
        return self.pad_to(max(longest, 1))

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        nb = device is not None and torch.device(device).type != "cpu"  # see _h2d
        return PromptEmbeds(
            self.t5.to(device, dtype, non_blocking=nb), self.mask.to(device, non_blocking=nb),
            self.pooled.to(device, dtype, non_blocking=nb), self.lengths,
        )

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        length = max(p.t5.shape[1] for p in items)
        items = [p.pad_to(length) for p in items]
        known = all(p.lengths is not None for p in items)
        return PromptEmbeds(
            torch.cat([p.t5 for p in items]), torch.cat([p.mask for p in items]), torch.cat([p.pooled for p in items]),
            tuple(n for p in items for n in p.lengths) if known else None,
        )


def with_visible_padding(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, L) bool prefix mask -> the same with the first k padding positions after each prompt also True (fewer
    where the row runs out of padding). k = 0 returns `mask` itself."""
    if k == 0:
        return mask
    length = mask.sum(1, keepdim=True)  # real tokens are a prefix (right padding)
    pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
    return pos < length + k


class TextEncoder:
    """Frozen T5 (and CLIP-L where the family has it) from a diffusers FLUX or Chroma directory. A family whose text
    features are stacked hidden layers (FLUX.2) gets its own encoder, `StackedTextEncoder` below."""

    def __new__(cls, path: str | Path, **kwargs):
        if cls is TextEncoder and family_of_dir(path).text_layers:
            cls = StackedTextEncoder
        return super().__new__(cls)

    def __init__(self, path: str | Path, *, dtype: torch.dtype, device: torch.device):
        # deferred: transformers takes seconds to import, and only loading the encoders needs it
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = check_model_dir(path)
        family = family_of_dir(path)
        self.device = device
        t5_dir, t5_tok = family.t5
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(str(path / t5_tok))
        # transformers 4.57 takes `dtype` (its `torch_dtype` logs "`torch_dtype` is deprecated!" on every load)
        self.t5 = T5EncoderModel.from_pretrained(str(path / t5_dir), dtype=dtype)
        self.clip = self.clip_tokenizer = None
        if family.clip is not None:
            clip_dir, clip_tok = family.clip
            self.clip_tokenizer = CLIPTokenizer.from_pretrained(str(path / clip_tok))
            self.clip = CLIPTextModel.from_pretrained(str(path / clip_dir), dtype=dtype)
        for m in (self.clip, self.t5):
            if m is not None:
                m.to(device).eval().requires_grad_(False)
        self._empty: dict[tuple[int, bool, int], PromptEmbeds] = {}

    @torch.no_grad()
    def encode(
        self, prompts: list[str], *, max_tokens: int, masked: bool = True, visible_padding: int = 0
    ) -> PromptEmbeds:
        """masked=False reproduces FluxPipeline/schnell: T5 attends to its padding and the states keep it.

        visible_padding=k (`objective.visible_padding_tokens`, masked only): the first k pads after each prompt
        join its mask with their T5 states, as Chroma's `modify_mask_to_attend_padding` does. T5 itself still runs
        with the real-token mask, so a visible pad's state depends on the prompt alone, not on max_tokens."""
        pooled = self.pooled(prompts)
        t5_in = self.t5_tokenizer(
            prompts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt"
        )
        lengths = tuple(t5_in.attention_mask.sum(1).tolist())  # on the host, before the mask goes to the device
        mask = _h2d(t5_in.attention_mask, self.device).bool()  # (B, L)
        ids = _h2d(t5_in.input_ids, self.device)
        if not masked:
            return PromptEmbeds(self.t5(ids)[0], mask, pooled, lengths)
        states = self.t5(ids, attention_mask=mask.long())[0]  # (B, L, D)
        mask = with_visible_padding(mask, visible_padding)
        # The host lengths count what the mask keeps, visible pads included: trimming must not cut them off.
        lengths = tuple(min(n + visible_padding, max_tokens) for n in lengths)
        # Zero the masked rows: they are never attended to, and zeros make that visible in dumps.
        states = states * mask[..., None].to(states.dtype)
        return PromptEmbeds(states, mask, pooled, lengths)

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """(B, D_clip) CLIP's pooled output alone (no T5 pass): what FLUX's pooled-text embedder reads; (B, 0) without
        CLIP (Chroma: nothing to condition on)."""
        if self.clip is None:
            return torch.zeros(len(prompts), 0, device=self.device, dtype=self.t5.dtype)
        clip_ids = _h2d(self.clip_tokenizer(
            prompts,
            padding="max_length",
            max_length=min(self.clip_tokenizer.model_max_length, self.clip.config.max_position_embeddings),
            truncation=True,
            return_tensors="pt",
        ).input_ids, self.device)
        return self.clip(clip_ids, output_hidden_states=False).pooler_output

    def token_count(self, caption: str, *, max_tokens: int) -> int:
        """T5 tokens of one caption (with </s>), as `encode` would keep them: what length grouping sorts by."""
        return len(self.t5_tokenizer(caption, truncation=True, max_length=max_tokens).input_ids)

    def empty(self, *, max_tokens: int, masked: bool = True, visible_padding: int = 0) -> PromptEmbeds:
        """The empty-prompt encoding (caption dropout and CFG's unconditional branch), cached."""
        key = (max_tokens, masked, visible_padding)
        if key not in self._empty:
            self._empty[key] = self.encode([""], max_tokens=max_tokens, masked=masked, visible_padding=visible_padding)
        return self._empty[key]


# ---- FLUX.2: stacked hidden layers of a causal text model
# FLUX.2's text features: hidden states of three layers of a causal text model (Mistral3 for [dev], Qwen3 for
# [klein]), stacked per token, with the bool padding mask.
#
# The prompt is wrapped as each pipeline wraps it (Flux2Pipeline: its system message, chat template, no generation
# prompt; Flux2KleinPipeline: one user turn, generation prompt, thinking off), so the features are the stock
# pipelines' for the same tokens. Two differences, both for the mask: the text is padded on the right (the real tokens
# are a prefix; a causal model's states of a prefix do not depend on what follows), and masked rows are zeroed.
# Like the stock pipelines, the text model always runs with its attention mask; `masked=False` keeps the pads' states
# (what the stock pipelines hand the transformer, unmasked).


def _dev_chat(tokenizer, prompts: list[str]) -> list[str]:
    # deferred: diffusers takes seconds to import, and only FLUX.2 [dev]'s prompts need it
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    return [tokenizer.apply_chat_template(m, add_generation_prompt=False, tokenize=False)
            for m in format_input(prompts=prompts, system_message=SYSTEM_MESSAGE)]


def _klein_chat(tokenizer, prompts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          enable_thinking=False, tokenize=False) for p in prompts]


CHAT = {"flux2": _dev_chat, "flux2-klein": _klein_chat}
"""family name -> how its pipeline wraps a prompt before tokenising."""


def text_model_config(path: str | Path, layers: tuple[int, ...]):
    """The text model's config, cut to one layer past the deepest stacked one: FLUX.2 reads hidden states 10/20/30 of
    Mistral3's 40 layers (9/18/27 of Qwen3's 36), and a causal model's state after layer k does not depend on the layers
    above it, so the layers above are never run or loaded (19.0B of [dev]'s 24.0B text model is loaded; 6.6B of klein
    9B's 8.2B). One layer more is kept because the last hidden state transformers returns is the final norm's
    output, not the layer's.
    """
    from transformers import AutoConfig  # deferred: transformers takes seconds to import (see StackedTextEncoder)

    config = AutoConfig.from_pretrained(str(path))
    text = config.get_text_config()
    text.num_hidden_layers = min(text.num_hidden_layers, max(layers) + 1)
    if getattr(text, "layer_types", None):  # Qwen3's per-layer attention kinds, one per layer
        text.layer_types = text.layer_types[: text.num_hidden_layers]
    return config


class StackedTextEncoder(TextEncoder):
    """Frozen FLUX.2 text model and tokenizer; the same interface as the T5 TextEncoder (`t5` is the text model)."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype, device: torch.device):
        # deferred: transformers takes seconds to import, and only loading the encoder needs it
        import transformers
        from transformers import AutoTokenizer

        path = check_model_dir(path)
        family = family_of_dir(path)
        self.device = device
        self.layers = family.text_layers
        self._chat = CHAT[family.name]
        enc_dir, tok_dir = family.t5
        self.t5_tokenizer = AutoTokenizer.from_pretrained(str(path / tok_dir))
        self.t5_tokenizer.padding_side = "right"  # real tokens first: see the module docstring
        config = text_model_config(path / enc_dir, self.layers)
        # the checkpoint's layers past `config`'s depth are left unread: transformers would warn about each of them
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            self.t5 = getattr(transformers, config.architectures[0]).from_pretrained(
                str(path / enc_dir), config=config, dtype=dtype)
        finally:
            transformers.logging.set_verbosity(verbosity)
        self.t5.to(device).eval().requires_grad_(False)
        self.clip = self.clip_tokenizer = None
        self._empty: dict[tuple[int, bool, int], PromptEmbeds] = {}

    def _tokens(self, prompts: list[str], max_tokens: int, **kwargs):
        return self.t5_tokenizer(self._chat(self.t5_tokenizer, prompts), truncation=True, max_length=max_tokens,
                                 add_special_tokens=False, **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str], *, max_tokens: int, masked: bool = True,
               visible_padding: int = 0) -> PromptEmbeds:
        tokens = self._tokens(prompts, max_tokens, padding="max_length", return_tensors="pt")
        lengths = tuple(tokens.attention_mask.sum(1).tolist())
        mask = _h2d(tokens.attention_mask, self.device).bool()  # (B, L)
        out = self.t5(input_ids=_h2d(tokens.input_ids, self.device), attention_mask=mask.long(),
                      output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in self.layers], dim=2)  # (B, L, 3, D)
        states = states.flatten(2)  # (B, L, 3D): layer-major per token, as the pipelines' permute + reshape
        pooled = self.pooled(prompts)
        if not masked:
            return PromptEmbeds(states, mask, pooled, lengths)
        mask = with_visible_padding(mask, visible_padding)
        lengths = tuple(min(n + visible_padding, max_tokens) for n in lengths)
        return PromptEmbeds(states * mask[..., None].to(states.dtype), mask, pooled, lengths)

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """(B, 0): FLUX.2 has no pooled text input."""
        return torch.zeros(len(prompts), 0, device=self.device, dtype=self.t5.dtype)

    def token_count(self, caption: str, *, max_tokens: int) -> int:
        return len(self._tokens([caption], max_tokens).input_ids[0])
