"""FLUX.2's text features: hidden states of three layers of a causal text model (Mistral3 for [dev], Qwen3 for
[klein]), stacked per token, with the bool padding mask.

The prompt is wrapped as each pipeline wraps it (Flux2Pipeline: its system message, chat template, no generation
prompt; Flux2KleinPipeline: one user turn, generation prompt, thinking off), so the features are the stock
pipelines' for the same tokens. Two differences, both for the mask: the text is padded on the right (the real tokens
are a prefix; a causal model's states of a prefix do not depend on what follows), and masked rows are zeroed.
Like the stock pipelines, the text model always runs with its attention mask; `masked=False` keeps the pads' states
(what the stock pipelines hand the transformer, unmasked).
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.text import PromptEmbeds, TextEncoder, _h2d, with_visible_padding


def _dev_chat(tokenizer, prompts: list[str]) -> list[str]:
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    return [tokenizer.apply_chat_template(m, add_generation_prompt=False, tokenize=False)
            for m in format_input(prompts=prompts, system_message=SYSTEM_MESSAGE)]


def _klein_chat(tokenizer, prompts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          enable_thinking=False, tokenize=False) for p in prompts]


CHAT = {"flux2": _dev_chat, "flux2-klein": _klein_chat}
"""family name -> how its pipeline wraps a prompt before tokenising."""


class StackedTextEncoder(TextEncoder):
    """Frozen FLUX.2 text model and tokenizer; the same interface as the T5 TextEncoder (`t5` is the text model)."""

    def __init__(self, path: str | Path, *, dtype: torch.dtype, device: torch.device):
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        from train.family import family_of_dir
        from train.model import check_model_dir

        path = check_model_dir(path)
        family = family_of_dir(path)
        self.device = device
        self.layers = family.text_layers
        self._chat = CHAT[family.name]
        enc_dir, tok_dir = family.t5
        self.t5_tokenizer = AutoTokenizer.from_pretrained(str(path / tok_dir))
        self.t5_tokenizer.padding_side = "right"  # real tokens first: see the module docstring
        arch = AutoConfig.from_pretrained(str(path / enc_dir)).architectures[0]
        self.t5 = getattr(transformers, arch).from_pretrained(str(path / enc_dir), dtype=dtype)
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
