"""What a run trains with, built from its config: the transformer inside its parallel backend (which also builds the
optimizer), and the frozen VAE and text encoders a step may need."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from functools import partial

import torch

from train.adapters import adapter_groups, apply_adapter, trainable_named_parameters
from train.config import JobConfig
from train.family import family_of_dir
from train.lycoris_format import load_lycoris_lokr
from train.model import load_transformer, load_vae, resolve_dtype
from train.optim import build_optimizer
from train.parallel import Backend, StepConfig, build_backend
from train.parallel.load import materialize as materialize_sharded
from train.parallel.load import meta_transformer
from train.parallelize import DistInfo, shard_text_encoder
from train.quant import quant_target_names, quantize_linear, torchao_config
from train.step import Encoders
from train.text import TextEncoder


def build_model(cfg: JobConfig, info: DistInfo) -> tuple[Backend, torch.dtype]:
    """Base transformer, adapter, fp32 trainable params, then the parallel backend (FSDP2 or DeepSpeed,
    `parallel.backend`), which also builds the optimizer over the parameters in its own form.

    FSDP2 loads sharded (train/parallel/load.py): meta -> adapter -> fully_shard -> each rank reads only its rows of
    the base weights, so no rank ever holds the whole model. DeepSpeed gets the whole model on every rank and
    partitions it itself (docs/cluster.md says what that costs)."""
    dtype = resolve_dtype(cfg.model.dtype, info.device)
    sharded = cfg.parallel.backend == "fsdp2"
    guidance = dict(guidance=cfg.model.guidance, guidance_scale=cfg.model.guidance_scale)
    if sharded:
        transformer, weights = meta_transformer(cfg.model.path, dtype=dtype, **guidance)
    else:
        transformer = load_transformer(cfg.model.path, dtype=dtype, **guidance)
    apply_adapter(transformer, cfg.model.adapter)  # on meta: the new adapter's weights are still real (CPU)
    for _, p in trainable_named_parameters(transformer):
        p.data = p.data.float()  # fp32 master copy of what trains; frozen weights stay in `dtype`
    if cfg.model.adapter.init_from:  # after the fp32 cast: the file's factors are not rounded to `dtype`
        n = load_lycoris_lokr(transformer, cfg.model.adapter.init_from)
        if info.is_main:
            print(f"[dedistill] adapter init_from {cfg.model.adapter.init_from}: {n} LoKr layers", flush=True)
    if info.is_main:  # before sharding: what trains, and at which effective scale (LyCORIS users check this)
        for group in adapter_groups(transformer, cfg.model.adapter):
            print(f"[dedistill] adapter {group.line()}", flush=True)
    materialize = None
    quantized = quant_target_names(transformer) if cfg.model.base_quant != "none" else []
    if quantized:
        torchao_config(cfg.model.base_quant)  # a missing torchao fails here, before any weight is read
    if sharded:
        initial = {n: p.detach() for n, p in trainable_named_parameters(transformer) if not p.is_meta}
        transformer.to("meta")  # the adapter's initial values live on in `initial` until the shards are filled
        materialize = partial(materialize_sharded, index=weights, initial=initial, deferred=quantized,
                              finish=partial(quantize_linear, kind=cfg.model.base_quant))
    backend = build_backend(
        transformer,
        cfg.parallel,
        info=info,
        compute_dtype=dtype,
        step=StepConfig(
            micro_batch_size=cfg.train.batch_size,
            grad_accum=cfg.train.grad_accum,
            grad_clip=cfg.train.grad_clip,
            activation_checkpointing=cfg.train.activation_checkpointing,
        ),
        make_optimizer=lambda params: build_optimizer(params, cfg.optim),
        materialize=materialize,
        replicated=frozenset(quantized),
    )
    return backend, dtype


def load_text_encoder(cfg: JobConfig, info: DistInfo, dtype: torch.dtype) -> TextEncoder:
    """The text model (+ CLIP) where `model.text_encoder_placement` puts them (device, cpu, or the text model sharded
    with FSDP2)."""
    placement = cfg.model.text_encoder_placement
    text = TextEncoder(cfg.model.path, dtype=dtype, device=torch.device("cpu") if placement == "cpu" else info.device)
    if placement == "fsdp":
        shard_text_encoder(text.t5, info, blocks=family_of_dir(cfg.model.path).text_blocks)
    return text


def load_encoders(cfg: JobConfig, info: DistInfo, dtype: torch.dtype, *, load: bool) -> Encoders:
    """The VAE and text encoders when `load` (raw data), else none of them (precomputed data)."""
    return Encoders(
        vae=load_vae(cfg.model.path, dtype=dtype, device=info.device) if load else None,
        text=load_text_encoder(cfg, info, dtype) if load else None,
        dtype=dtype,
        device=info.device,
    )


@contextmanager
def encoders_for_sampling(encoders: Encoders, cfg: JobConfig, info: DistInfo):
    """Sampling needs the VAE and the text encoders: a precomputed run loads them only for it, and frees them after."""
    if encoders.vae is not None and encoders.text is not None:
        yield encoders
        return
    parts = load_encoders(cfg, info, encoders.dtype, load=True)
    try:
        yield parts
    finally:
        parts.vae = parts.text = None
        gc.collect()
