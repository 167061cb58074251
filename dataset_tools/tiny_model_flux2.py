"""Tiny random FLUX.2 pipelines in diffusers layout, built locally (no hub): [dev]-shaped (`--family flux2`:
guidance embedder, Mistral3 text model, Flux2Pipeline) and [klein]-shaped (`--family flux2-klein`: no guidance
embedder, Qwen3 text model, Flux2KleinPipeline).

Choices worth knowing:
- Text models have as many layers as the real ones' deepest stacked layer (30 for Mistral3, 27 for Qwen3), so the
  pipelines' default `text_encoder_out_layers` work; each layer is 16 wide, so the stacked features are 48 wide
  (the transformer's `joint_attention_dim`).
- The tokenizer is a word-level `tokenizers` model over the tiny-data caption vocabulary (every caption word is a
  token), with the real model's chat markers and a chat template, saved as a PreTrainedTokenizerFast. It pads on the
  right: real tokens are a prefix, which the padding mask assumes (a causal model's states of a prefix do not
  depend on what follows).
- VAE: AutoencoderKLFlux2 with 32 latent channels and 8x downsampling; its BatchNorm running statistics are set to
  seeded non-trivial values, so the normalisation is exercised (FLUX.2's own are not 0 / 1 either).
- Scheduler: FLUX.2's (FlowMatchEuler, dynamic exponential shift; the pipelines pass `compute_empirical_mu`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from dataset_tools.seeding import seeded

WIDTH = 16  # text model hidden size; stacked features are 3 x WIDTH

TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=3 * WIDTH, timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(16, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
    norm_num_groups=4, sample_size=64,
)
SCHEDULER = dict(  # FLUX.2's scheduler/scheduler_config.json
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential", base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)

# Chat templates in each real tokenizer's markup; a message's content is a string or a list of {"type": "text"} parts
# (Flux2Pipeline's `format_input` sends lists).
_TEXT = ("{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- else -%}"
         "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
         "{%- endif -%}")
MISTRAL_TEMPLATE = ("<s>{%- for m in messages -%}" + _TEXT +
                    "{%- if m['role'] == 'system' -%}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
                    "{%- elif m['role'] == 'user' -%}[INST]{{ text }}[/INST]"
                    "{%- else -%}{{ text }}</s>{%- endif -%}{%- endfor -%}")
QWEN_TEMPLATE = ("{%- for m in messages -%}" + _TEXT + "<|im_start|>{{ m['role'] }}\n{{ text }}<|im_end|>{{ '\\n' }}"
                 "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n"
                 "{%- if enable_thinking is defined and enable_thinking is false -%}<think>\n\n</think>\n\n{%- endif -%}"
                 "{%- endif -%}")
# family: (special tokens, pad, eos, chat template)
_TOKENS = {
    "flux2": (["<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
              "<pad>", "</s>", MISTRAL_TEMPLATE),
    "flux2-klein": (["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                    "<|endoftext|>", "<|im_end|>", QWEN_TEMPLATE),
}


def write_tokenizer(folder: Path, corpus: list[str], family: str):
    """A word-level PreTrainedTokenizerFast over `corpus` (plus the system message's words) with the family's chat
    markers and template, right padding."""
    # deferred: diffusers and transformers take seconds to import; only building the tiny model needs them
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    specials, pad, eos, template = _TOKENS[family]
    split = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    words: dict[str, None] = {}
    for line in [*corpus, SYSTEM_MESSAGE]:
        for piece, _ in split.pre_tokenize_str(line):
            words.setdefault(piece.lower())
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, "\n", *sorted(words)]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=pad, eos_token=eos,
                                   padding_side="right", model_max_length=512)
    fast.chat_template = template
    fast.save_pretrained(str(folder))
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _text_model(family: str, vocab: int, pad_id: int):
    # deferred: transformers takes seconds to import; only building the tiny model needs it
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=-(-vocab // 8) * 8, hidden_size=WIDTH, intermediate_size=32, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=pad_id)
    if family == "flux2":
        cfg = Mistral3Config(
            text_config=MistralConfig(num_hidden_layers=30, **common).to_dict(),
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=32,
                                              patch_size=16).to_dict(),
            image_token_index=vocab - 1, multimodal_projector_bias=False, spatial_merge_size=2,
        )
        return Mistral3ForConditionalGeneration(cfg)
    return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=27, tie_word_embeddings=True, **common))


def _vae():
    # deferred: diffusers takes seconds to import; only building the tiny model needs it
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**VAE)
    n = vae.bn.running_mean.numel()
    vae.bn.running_mean.copy_(0.2 * torch.randn(n))
    vae.bn.running_var.copy_(0.5 + torch.rand(n))
    return vae


def build_flux2_pipeline(tok_dir: Path, corpus: list[str], size: str, seed: int, torch_dtype, *, family: str):
    """Flux2Pipeline ([dev]-shaped) or Flux2KleinPipeline (is_distilled false: the Base, real CFG)."""
    # deferred: diffusers takes seconds to import; only building the tiny model needs it
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    if size != "tiny":
        raise ValueError(f"--size: {family} has only the tiny size (got '{size}')")
    tok = write_tokenizer(tok_dir / "tokenizer", corpus, family)
    dev = family == "flux2"
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        transformer=seeded(seed * 16 + 0, lambda: Flux2Transformer2DModel(**TRANSFORMER, guidance_embeds=dev),
                            torch_dtype),
        vae=seeded(seed * 16 + 1, _vae, torch_dtype),
        text_encoder=seeded(seed * 16 + 2, lambda: _text_model(family, len(tok), tok.pad_token_id), torch_dtype),
        tokenizer=tok,
    )
    if dev:
        return diffusers.Flux2Pipeline(**parts)
    return diffusers.Flux2KleinPipeline(**parts, is_distilled=False)
