"""The model-family table: everything that differs between FLUX and Chroma, looked up, never branched on.

A family is named by the transformer class in the model dir's `transformer/config.json` (`_class_name`), so a run
never states it: `family_of_dir(model.path)`. Everything else (loading, the velocity call and its mask, adapter
targets, FSDP2/DeepSpeed block wrapping, checkpoints, sampling, export) asks the `ModelFamily` row.

What differs, and why it is a field:
- `transformer_class` / `pipeline_class`: the diffusers classes (`FluxTransformer2DModel` + `FluxPipeline`;
  `ChromaTransformer2DModel` + `ChromaPipeline`).
- `t5` / `clip`: where the text encoders live in the pipeline dir. FLUX: CLIP-L in text_encoder/, T5 in
  text_encoder_2/. Chroma has no CLIP (its pooled input was pruned with the modulation Linears): T5 in text_encoder/.
- `call`: how the transformer is called. FLUX takes CLIP's pooled vector and the bool key mask through
  `joint_attention_kwargs` (key-only: every query row keeps the image keys). Chroma takes no pooled vector and no
  guidance; its blocks turn the `attention_mask` argument (B, S) into `mask[:, None, None, :] * mask[:, None, :, None]`
  (query AND key), which stays bool when the mask is bool. Masked text queries then attend to nothing: SDPA returns
  zeros for such rows on the CPU, but some CUDA kernels NaN, so `prepare` installs a processor that keeps those
  rows finite; their outputs are never read (the text rows are dropped after the last block).
- `block_lists`: the transformer's block ModuleLists, double-stream first: what FSDP2 shards one by one, what
  activation checkpointing and `torch.compile` wrap, and where adapters go (`model.adapter.blocks` /
  `single_blocks` index them). The same attribute names in both families; the classes differ (`block_classes`).
- `pipeline_template`: the self-contained masked pipeline that `--format diffusers` exports as `pipeline.py`.
- `export_formats`: what `dedistill export` can write for it (BFL single-file keys exist for FLUX only).
- `guidance_embedder`: where a guidance-distilled checkpoint (`guidance_embeds: true` in its transformer config:
  FLUX.1-dev, Krea-dev, Kontext-dev) keeps its embedded-guidance input. `model.guidance: bypass` loads the model
  without those weights and with `guidance_embeds: false` (train/model.py), so training, sampling and every export
  see a schnell-shaped transformer; empty for a family with no such input (Chroma).
- `text_blocks`: the text model's layer list, which `model.text_encoder_placement: fsdp` shards layer by layer.
- `text_layers`: FLUX.2 reads hidden states of three layers of a causal text model, stacked per token; T5 families
  read the last hidden state (empty). Several families may share a transformer class (FLUX.2 [dev] and [klein] are
  both `Flux2Transformer2DModel`): a dir's `model_index.json` `_class_name` (the pipeline) then picks the row, and a
  transformer instance maps to the first row of its class (everything a transformer alone decides is the same).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from train.flux2 import call_flux2
from train.model_schema import check_transformer_config

VelocityCall = Callable[..., torch.Tensor]


def _call_flux(transformer, *, x, t, t5, pooled, key_mask, img_ids, txt_ids, guidance=None) -> torch.Tensor:
    # guidance: (B,) scales for a transformer that embeds them (unscaled, as FluxPipeline passes them; the model
    # multiplies by 1000 itself); None for a schnell-shaped one.
    kwargs = {"attention_mask": key_mask} if key_mask is not None else None
    return transformer(hidden_states=x, timestep=t, pooled_projections=pooled, encoder_hidden_states=t5,
                       txt_ids=txt_ids, img_ids=img_ids, guidance=guidance, joint_attention_kwargs=kwargs,
                       return_dict=False)[0]


def _call_chroma(transformer, *, x, t, t5, pooled, key_mask, img_ids, txt_ids) -> torch.Tensor:
    # No pooled vector, no guidance: Chroma's approximator sees only the timestep (guidance is fed as 0 inside).
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=t5, txt_ids=txt_ids, img_ids=img_ids,
                       attention_mask=key_mask, return_dict=False)[0]


def _flux_constant_guidance(model: torch.nn.Module, scale: float) -> None:
    """`model.guidance: keep`: feed the guidance embedder `scale` whenever the caller passes no guidance (every
    training and sampling forward; a teacher passes its own w). FluxTransformer2DModel calls
    `time_text_embed(timestep, pooled)` without guidance and `(timestep, guidance, pooled)` with it, the timestep
    already ×1000 in the hidden dtype; the hook adds what `guidance=full(scale)` would have given, bit for bit."""

    def feed(module, args):
        if len(args) != 2:
            return None
        timestep, pooled = args
        return timestep, torch.full_like(timestep, scale) * 1000, pooled

    model.time_text_embed.register_forward_pre_hook(feed)


def _flux2_constant_guidance(model: torch.nn.Module, scale: float) -> None:
    """`model.guidance: keep` for FLUX.2 [dev]: Flux2Transformer2DModel always calls `time_guidance_embed(timestep,
    guidance)`, guidance None when the caller passed none (both already ×1000 in the hidden dtype otherwise); the
    hook puts in what `guidance=full(scale)` would have given."""

    def feed(module, args):
        timestep, guidance = args
        if guidance is not None:
            return None
        return timestep, torch.full_like(timestep, scale) * 1000

    model.time_guidance_embed.register_forward_pre_hook(feed)


def _no_empty_query_rows(model: torch.nn.Module) -> None:
    """Give every Chroma attention a processor that lets a fully masked query row attend everywhere.

    Chroma's blocks turn the (B, S) mask into `mask[:, None, None, :] * mask[:, None, :, None]`, so a masked text
    query attends to nothing. Some SDPA kernels return NaN for such a row (CUDA memory-efficient attention,
    pytorch/pytorch#110213), and a NaN value leaks through a masked key in the next block (0 · NaN). Letting that
    row attend to every key keeps it finite; its output is never read (it is a masked key for every other query,
    and text rows are dropped after the last block), so every other output is unchanged, bit for bit
    (tests/unit/test_family.py). FLUX needs nothing: its key-only mask leaves every row the image keys."""
    # deferred: diffusers takes seconds to import; the family table is read without it (`dedistill --help` too)
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    class NoEmptyRowsProcessor(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = attention_mask | ~attention_mask.any(dim=-1, keepdim=True)  # (B, 1, S, S)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    for module in model.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(NoEmptyRowsProcessor())


def _nothing(model: torch.nn.Module) -> None:
    pass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    transformer_class: str
    pipeline_class: str
    t5: tuple[str, str]
    """(encoder subdir, tokenizer subdir) of T5 in the pipeline dir."""
    clip: tuple[str, str] | None
    """(encoder subdir, tokenizer subdir) of CLIP-L, or None: the transformer takes no pooled vector."""
    call: VelocityCall
    block_classes: tuple[str, str]
    pipeline_template: str
    export_formats: tuple[str, ...]
    stock_mask: str
    """What the family's stock diffusers pipeline does with the T5 padding mask (the export's model card says it)."""
    prepare: Callable[[torch.nn.Module], None]
    """Run on every transformer this family builds (`train.model.build_transformer_meta`): attention processors."""
    block_lists: tuple[str, str] = ("transformer_blocks", "single_transformer_blocks")
    adapter_examples: str = "to_q, to_out.0, ff.net.0.proj, proj_mlp, proj_out"
    """Valid `model.adapter.target_modules` suffixes, for the error message when one matches nothing."""
    attentions: tuple[str, ...] = ("sdpa",)
    """`objective.attention` values this family's call supports. flex needs a BlockMask built from the key mask;
    Chroma's forward turns its (B, S) mask into a (B, 1, S, S) query-and-key mask itself, so it takes no BlockMask."""
    guidance_embedder: str = ""
    """Prefix of the embedded-guidance weights of a guidance-distilled checkpoint (`guidance_embeds: true`); "" when
    the family has none. What `model.guidance: bypass` leaves out of the model."""
    constant_guidance: Callable[[torch.nn.Module, float], None] | None = None
    """`model.guidance: keep`: makes a guidance-embedding transformer feed a constant scale when called without one."""

    def embeds_guidance(self, config: dict) -> bool:
        """True for a guidance-distilled transformer config of this family (`guidance_embeds: true`)."""
        return bool(self.guidance_embedder) and bool(config.get("guidance_embeds"))
    text_layers: tuple[int, ...] = ()
    """Hidden-state indices of the text model stacked as the transformer's text features (FLUX.2); () = T5's output."""
    vae_class: str = "AutoencoderKL"
    """The diffusers VAE class in vae/ (its latent normalisation: train.flux.LATENT_NORMS)."""
    empirical_mu: bool = False
    """The model's own dynamic schedule takes mu from the image token count *and* the step count (FLUX.2's
    `compute_empirical_mu`), not FLUX.1's line through (base_seq_len, base_shift), (max_seq_len, max_shift)."""
    text_blocks: str = "encoder.block"
    """Where the text model keeps its layers: what `model.text_encoder_placement: fsdp` shards one by one (T5's
    encoder blocks; the decoder layers of FLUX.2's Mistral3 or Qwen3)."""
    shared_modules: tuple[str, ...] = ()
    """Trunk modules outside the blocks whose output every block reads (FLUX.2's modulation, 566M at [dev] size).
    FSDP2 makes each its own unit (train/parallelize.py): gathered for its one forward at the start of the step,
    resharded, gathered again for its backward; only its small output lives through the blocks."""

    @property
    def components(self) -> tuple[str, ...]:
        """Subdirs a diffusers-format pipeline dir of this family must have."""
        parts = ["transformer", "vae", *self.t5]
        return tuple(parts + list(self.clip or ()))

    def transformer_cls(self):
        import diffusers  # deferred: seconds to import, only when a model is built

        return getattr(diffusers, self.transformer_class)

    def pipeline_cls(self):
        import diffusers  # deferred: seconds to import, only when a pipeline is built

        return getattr(diffusers, self.pipeline_class)

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Every transformer block, double-stream then single-stream (57 for FLUX.1 and Chroma)."""
        return [b for attr in self.block_lists for b in getattr(model, attr)]


FAMILIES: dict[str, ModelFamily] = {
    "flux": ModelFamily(
        name="flux",
        transformer_class="FluxTransformer2DModel",
        pipeline_class="FluxPipeline",
        t5=("text_encoder_2", "tokenizer_2"),
        clip=("text_encoder", "tokenizer"),
        call=_call_flux,
        block_classes=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        pipeline_template="masked_flux_pipeline.py",
        export_formats=("diffusers", "lora", "lycoris", "bfl"),
        stock_mask="passes no mask (the image then also changes with `max_sequence_length`)",
        prepare=_nothing,
        adapter_examples="to_q, to_out.0, ff.net.0.proj, proj_mlp, proj_out, norm1.linear",
        attentions=("sdpa", "flex"),
        guidance_embedder="time_text_embed.guidance_embedder.",
        constant_guidance=_flux_constant_guidance,
    ),
    "chroma": ModelFamily(
        name="chroma",
        transformer_class="ChromaTransformer2DModel",
        pipeline_class="ChromaPipeline",
        t5=("text_encoder", "tokenizer"),
        clip=None,
        call=_call_chroma,
        block_classes=("ChromaTransformerBlock", "ChromaSingleTransformerBlock"),
        pipeline_template="masked_chroma_pipeline.py",
        export_formats=("diffusers", "lora", "lycoris"),
        stock_mask="builds the mask as float 0/1, which SDPA adds to the scores: it masks nothing, and every pad "
                   "reaches the image",
        prepare=_no_empty_query_rows,
    ),
    # FLUX.2 [dev]: guidance-distilled (guidance_embeds true; guidance=None leaves the embedder out of the graph),
    # Mistral3 text model, layers 10/20/30. The modulation is shared by all blocks and sits outside them
    # (566M parameters at [dev] size): each modulation is an FSDP2 unit of its own, see `shared_modules`.
    "flux2": ModelFamily(
        name="flux2",
        transformer_class="Flux2Transformer2DModel",
        pipeline_class="Flux2Pipeline",
        t5=("text_encoder", "tokenizer"),
        clip=None,
        call=call_flux2,
        block_classes=("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
        pipeline_template="masked_flux2_pipeline.py",
        export_formats=("diffusers", "lora"),
        stock_mask="pads the text to 512 tokens and passes no mask: every pad reaches the image",
        prepare=_nothing,
        adapter_examples="to_q, to_out.0, ff.linear_in, ff.linear_out, to_qkv_mlp_proj",
        text_layers=(10, 20, 30),
        text_blocks="model.language_model.layers",
        shared_modules=("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"),
        vae_class="AutoencoderKLFlux2",
        empirical_mu=True,
        guidance_embedder="time_guidance_embed.guidance_embedder.",
        constant_guidance=_flux2_constant_guidance,
    ),
}
# FLUX.2 [klein] (4B, 9B): [dev]'s row but for its pipeline, its Qwen3 text layers 9/18/27 and no guidance embedder;
# Base is undistilled (real CFG), the other is step-distilled.
FAMILIES["flux2-klein"] = replace(
    FAMILIES["flux2"], name="flux2-klein", pipeline_class="Flux2KleinPipeline", text_layers=(9, 18, 27),
    text_blocks="model.layers", guidance_embedder="", constant_guidance=None,
)
_BY_CLASS: dict[str, ModelFamily] = {}
for _f in FAMILIES.values():
    _BY_CLASS.setdefault(_f.transformer_class, _f)  # the first row of a shared class: see `text_layers` above


def family_of_class(class_name: str, *, where: str = "transformer") -> ModelFamily:
    if class_name not in _BY_CLASS:
        raise ValueError(f"{where}: transformer class {class_name!r} is not one of "
                         f"{', '.join(_BY_CLASS)} (model families: {', '.join(FAMILIES)})")
    return _BY_CLASS[class_name]


def family_of_dir(path: str | Path, *, key: str = "model.path") -> ModelFamily:
    """The family of a diffusers-format pipeline dir, from `transformer/config.json`'s `_class_name`."""
    f = Path(path) / "transformer" / "config.json"
    if not f.is_file():
        raise ValueError(f"{key}: '{path}' has no transformer/config.json (expected a diffusers-format pipeline)")
    try:
        config = check_transformer_config(json.loads(f.read_text()), where=f"{key}: {f}")
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{key}: {f} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    name = config.get("_class_name", "")
    if not isinstance(name, str):
        raise ValueError(f"{key}: {f}: _class_name: expected a class name, got {name!r:.60}")
    family = family_of_class(name, where=f"{key}: {f}")
    shared = [g for g in FAMILIES.values() if g.transformer_class == name]
    if len(shared) > 1:  # the pipeline class tells rows of one transformer class apart
        index = Path(path) / "model_index.json"
        pipeline = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
        family = next((g for g in shared if g.pipeline_class == pipeline), family)
    return family


def family_of_model(model: torch.nn.Module) -> ModelFamily:
    """The family of a transformer instance: plain, peft-injected, FSDP2-wrapped (a generated subclass) or inside a
    DeepSpeed engine (`.module`)."""
    model = getattr(model, "module", model)
    for cls in type(model).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    raise ValueError(f"transformer: {type(model).__name__} is not a known family ({', '.join(_BY_CLASS)})")
