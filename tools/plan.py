"""`dedistill plan`: what a training config needs per GPU, per node and per step — computed from the transformer
config on the meta device, so it runs for the real 12B FLUX.1 without weights (docs/cluster.md, docs/scaling.md).

Every number models what this code base does, not a generic trainer:

- **Parameters** (`train/build.py: build_model`): frozen base weights in the model dtype (bf16 on GPU), trainable
  parameters (adapter, or everything for `full`) in fp32. FSDP2 (`train/parallelize.py`) shards every parameter of
  every block and of the root over the shard group (the world, or one node with `parallel.hsdp`), padding dim 0 to a
  multiple of the group size. DeepSpeed ZeRO-2 keeps the module replicated in the compute dtype and partitions an fp32
  master copy, the gradients and AdamW's moments; ZeRO-3 partitions the module too.
- **Gradients** are fp32 like the parameters they belong to; **AdamW** (`train/optim.py`) keeps two fp32 moments (its
  per-parameter `step` is a CPU scalar); the **EMA** shadow is an fp32 copy of the trainable parameters, sharded as
  they are (FSDP2, ZeRO-3) or full (ZeRO-2, whose EMA tracks the module's parameters).
- **Activations** are counted per block from the architecture (`block_activations`): every tensor autograd saves in
  diffusers' FluxTransformerBlock / FluxSingleTransformerBlock forward, for full fine-tunes and for adapters (which
  save less: a frozen Linear keeps no input, a frozen modulation no normalised activations — but LoKr keeps its
  materialised ΔW per adapted Linear, LoRA its r-wide intermediate). Under CUDA autocast LayerNorm and RMSNorm run in
  fp32, so their saved tensors are 4 bytes; matmul/attention tensors are in the compute dtype. Attention is assumed to
  be a fused kernel that keeps q, k, v, the output and the log-sum-exp (PyTorch's efficient/flash SDPA, and the CPU
  flash kernel), not the T×T probabilities. `tests/unit/test_plan.py` checks the count against the tensors autograd
  actually saves on CPU; `bench/plan_vs_measured.py` against measured memory.
- **Communication** (`comm_per_step`): FSDP2 all-gathers each block's parameters in the compute dtype in the forward
  and again in the backward (`reshard_after_forward`), reduce-scatters the trainable gradients in
  `parallel.reduce_dtype` every micro-batch, and with HSDP all-reduces the gradient shards across nodes once per
  optimizer step (`backend.prepare_micro_batch`: only the last micro-batch's backward all-reduces).
- **Time** (`step_timing`) is a model, not a measurement: each phase (forward; backward with its recompute) hides
  only the collectives that run in it, at one-way link rates, while NCCL's kernels take some SMs from the compute.

Which lines are counted (checked to the byte against the trainer) and which are modelled is printed with the plan.

Units: bytes and FLOPs as plain numbers; GiB = 2^30 bytes, GB = 10^9 bytes (bandwidths).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import diffusers
import transformers
from transformers import AutoConfig

from train.adapters import adapted_module_names, apply_adapter
from train.config import JobConfig
from train.data import read_layout
from train.family import FAMILIES, ModelFamily, family_of_dir, family_of_model
from train.mfu import FlopsModel, flops_model
from train.model import build_transformer_meta
from train.model_schema import check_transformer_config
from train.quant import quant_target_names
from train.text import text_model_config

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]
FLUX1_SCHNELL_CONFIG = REPO / "configs" / "models" / "flux1-schnell" / "transformer" / "config.json"
"""The real FLUX.1-schnell transformer config, shipped so a plan needs no download."""

# Frozen parts the trainer loads when the data holds raw images and captions (train/build.py), with the FLUX.1
# component configs (text_encoder = CLIP ViT-L/14 text, text_encoder_2 = T5 v1.1 XXL encoder, vae = FLUX's 16-channel
# AutoencoderKL). Parameter counts are recounted on meta from these configs in tests/unit/test_plan.py.
ENCODER_PARAMS = {"t5": 4_762_310_656, "clip": 123_060_480, "vae": 83_819_683}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)

NCCL_RUNTIME_BYTES = {1: 1.6e9, 2: 3.8e9, 3: 6.0e9}
"""CUDA context + NCCL's buffers by the number of NCCL communicators a rank uses (3 = three or more), outside
PyTorch's allocator: about 1.6 GB with one communicator and about 6 GB with three or more, as reported in
NVIDIA/nccl issue 864 (NCCL's memory grows with each communicator's channels); 2 is interpolated."""
USABLE_FRACTION = 0.92
"""Fraction of the card the allocator can fill before fragmentation bites: the verdict keeps the rest (6.4 GiB of an
80 GiB card) as its margin, beyond every row of the plan."""
H100_SMS = 132

_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the cluster, and the model's parameter inventory (from meta)


@dataclass(frozen=True, kw_only=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    host_mem_gib: float = 1024.0
    device: str = "cuda"
    """cuda: bf16 compute with autocast where `model.dtype` is auto; cpu: fp32 (the CPU validation runs)."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM, train/mfu.py)."""
    mfu: float = 0.40
    """The fraction of peak the compute kernels reach (forward, backward and recompute alike)."""
    nvlink_gbs: float = 360.0
    """Intra-node bus bandwidth per GPU, one way, GB/s: what NCCL's ring collectives reach on 8 H100s (NVLink 4 is
    450 GB/s per direction nominal; 900 is both directions added, which a ring never uses)."""
    ib_gbits: float = 400.0
    """Inter-node bandwidth per NIC, one way, Gb/s (NDR InfiniBand, nominal), with one NIC per GPU."""
    ring_step_us: float = 5.0
    """Latency of one step of a ring collective (a ring of n ranks takes n - 1 steps; an all-reduce 2(n - 1))."""
    nccl_sms: int = 16
    """SMs NCCL's kernels occupy while a collective overlaps compute (of H100's 132): the compute slows by that
    fraction for as long as they run."""

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node", "gpu_mem_gib", "host_mem_gib", "peak_tflops", "mfu"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')}: must be > 0, got {getattr(self, key)}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit (a transformer block, a shared trunk module such as FLUX.2's modulation, or the root's
    remaining parameters): parameter shapes by role."""

    name: str
    frozen: tuple[tuple[int, ...], ...]
    trainable: tuple[tuple[int, ...], ...]
    quantized: tuple[tuple[int, ...], ...] = ()
    """`model.base_quant`: the frozen Linears' weights (int8/float8, a scale per row) and biases (compute dtype),
    kept whole on every rank by FSDP2 (train/quant.py); not in `frozen`, never gathered."""

    @staticmethod
    def _numel(shapes) -> int:
        return sum(math.prod(s) for s in shapes)

    @property
    def n_frozen(self) -> int:
        return self._numel(self.frozen)

    @property
    def n_trainable(self) -> int:
        return self._numel(self.trainable)

    @property
    def n_quantized(self) -> int:
        return self._numel(self.quantized)

    def quantized_bytes(self, b: int) -> int:
        """Bytes of the replicated quantized Linears: 1 per weight element + a 4-byte scale per row (float8's scale
        is fp32; int8's is in the compute dtype, so this bounds it), biases (1-D) in the compute dtype (`b`)."""
        return sum(math.prod(s) + 4 * s[0] if len(s) == 2 else math.prod(s) * b for s in self.quantized)

    def shard_numel(self, shapes, group: int) -> int:
        """Elements per rank after FSDP2's dim-0 sharding (dim 0 padded up to a multiple of the group)."""
        return sum(math.ceil(s[0] / group) * math.prod(s[1:]) if s else 1 for s in shapes)


@dataclass(frozen=True)
class Inventory:
    """What the meta model holds: FSDP units, adapted Linears (name -> (in, out)), and the architecture's widths."""

    units: tuple[Unit, ...]
    adapted: dict[str, tuple[int, int]]
    config: dict
    kind: str
    lora_rank: int
    flops: FlopsModel
    teacher: tuple[Unit, ...] = ()
    """`objective.kind: teacher`: the frozen teacher's FSDP units (the base with its guidance embedder, no adapter,
    sharded per block like the student: train/teacher.py); empty for the data objective."""

    @property
    def n_teacher(self) -> int:
        return sum(u.n_frozen for u in self.teacher)

    @property
    def student_rows(self) -> int:
        """Rows per sample the student's forward runs: 2 under the teacher objective (cond and uncond batched)."""
        return 2 if self.teacher else 1

    @property
    def n_trainable(self) -> int:
        return sum(u.n_trainable for u in self.units)

    @property
    def n_total(self) -> int:
        return sum(u.n_trainable + u.n_frozen + u.n_quantized for u in self.units)

    @property
    def hidden(self) -> int:
        return self.config["num_attention_heads"] * self.config["attention_head_dim"]

    @property
    def blocks(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.name != "root" and not u.name.startswith(SHARED))

    @property
    def shared(self) -> tuple[Unit, ...]:
        """The family's `shared_modules`: units of their own, gathered for their forward and again for their
        backward like a block, never held through the step like the root."""
        return tuple(u for u in self.units if u.name.startswith(SHARED))


SHARED = "shared."
"""Name prefix of a shared-module unit in the inventory."""


def transformer_config(cfg: JobConfig) -> tuple[dict, str]:
    """The transformer config of `model.path`, or the shipped FLUX.1-schnell one when the path is a placeholder."""
    path = Path(cfg.model.path) / "transformer" / "config.json" if cfg.model.path else None
    if path is not None and path.is_file():
        source = str(path)
    else:
        path, source = FLUX1_SCHNELL_CONFIG, f"{FLUX1_SCHNELL_CONFIG.relative_to(REPO)} (model.path not readable)"
    config = check_transformer_config(json.loads(path.read_text()), where=source)
    # _class_name stays: it names the family (FLUX.1, Chroma, FLUX.2) the meta model is built as
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}, source


def inventory(config: dict, cfg: JobConfig) -> Inventory:
    """Build the transformer on meta, apply the configured adapter (on meta too), and list what each unit holds."""

    model = build_transformer_meta(config, guidance=cfg.model.guidance, guidance_scale=cfg.model.guidance_scale)
    with torch.device("meta"):  # adapter weights on meta as well: a 3B-parameter LoKr must not be allocated
        apply_adapter(model, cfg.model.adapter)
    quant = {id(p) for n in (quant_target_names(model) if cfg.model.base_quant != "none" else [])
             for p in model.get_submodule(n).parameters()}
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(model.single_transformer_blocks)]
    # FLUX.2's modulation sits outside the blocks and is its own FSDP2 unit (train/parallelize.py)
    blocks += [(SHARED + name, model.get_submodule(name)) for name in family_of_model(model).shared_modules]
    in_blocks: set[int] = set()
    units = []
    for name, block in blocks:
        params = list(block.parameters())
        in_blocks |= {id(p) for p in params}
        units.append(Unit(name, tuple(tuple(p.shape) for p in params if not p.requires_grad and id(p) not in quant),
                          tuple(tuple(p.shape) for p in params if p.requires_grad),
                          tuple(tuple(p.shape) for p in params if id(p) in quant)))
    rest = [p for p in model.parameters() if id(p) not in in_blocks]
    units.append(Unit("root", tuple(tuple(p.shape) for p in rest if not p.requires_grad),
                      tuple(tuple(p.shape) for p in rest if p.requires_grad)))
    adapted = {}
    for name in adapted_module_names(model):
        base = model.get_submodule(name).get_base_layer()
        adapted[name] = (base.in_features, base.out_features)
    return Inventory(tuple(units), adapted, config, cfg.model.adapter.kind, cfg.model.adapter.rank, flops_model(model),
                     teacher_units(config) if cfg.objective.kind == "teacher" else ())


def teacher_units(config: dict) -> tuple[Unit, ...]:
    """The teacher's FSDP units: every block, then the root (its embedders, guidance embedder included), all frozen."""

    model = build_transformer_meta(config, guidance="keep")
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    units = [Unit(f"teacher.{i}", tuple(tuple(p.shape) for p in b.parameters()), ()) for i, b in enumerate(blocks)]
    rest = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks)
    return (*units, Unit("teacher.root", rest, ()))


# ---------------------------------------------------------------------------------------------------------------
# Activations: what autograd keeps per sample, counted from diffusers' block forwards


@dataclass(frozen=True)
class Saved:
    """Saved elements of one forward, by storage class: `act` in the compute dtype, `norm` = LayerNorm/RMSNorm
    tensors (fp32 under CUDA autocast), `stat` = mean/rstd/log-sum-exp (always fp32)."""

    act: float = 0.0
    norm: float = 0.0
    stat: float = 0.0

    def __add__(self, o: "Saved") -> "Saved":
        return Saved(self.act + o.act, self.norm + o.norm, self.stat + o.stat)

    def __mul__(self, k: float) -> "Saved":
        return Saved(self.act * k, self.norm * k, self.stat * k)

    def bytes(self, act_bytes: int, autocast: bool) -> float:
        return self.act * act_bytes + self.norm * (4 if autocast else act_bytes) + self.stat * 4


def _adapter_extra(inv: Inventory, prefix: str, tokens: dict[str, int], batch: int, policy: str) -> Saved:
    """What peft's layers add inside one block: LoRA keeps lora_A's output (S × r) for lora_B; LoKr materialises
    ΔW = kron(w1, w2) (out × in, once per forward, whatever the batch) and keeps it for F.linear's backward.
    Under the `ops` policy LoKr's F.linear output is a matmul output too (kept); ΔW is recomputed."""
    extra = Saved()
    for name, (fan_in, fan_out) in inv.adapted.items():
        if not name.startswith(prefix + "."):
            continue
        s = tokens["context"] if ".add_" in name or "ff_context" in name or "to_add_out" in name else tokens["image"]
        s = tokens["all"] if prefix.startswith("single") else s
        if inv.kind == "lora":
            extra += Saved(act=batch * s * inv.lora_rank * (2 if policy == "ops" else 1))
        elif inv.kind == "lokr":
            extra += Saved(act=batch * s * fan_out) if policy == "ops" else Saved(act=fan_in * fan_out)
    return extra


def block_activations(inv: Inventory, unit: Unit, *, image: int, text: int, batch: int, policy: str) -> Saved:
    """Elements one block keeps from its forward to its backward, for `batch` samples of `image` + `text` tokens.

    policy: none (nothing recomputed), full (the block is checkpointed: its inputs only), ops (torchtitan's
    op-level SAC: matmul and attention outputs kept). Derived from diffusers 0.39's FluxTransformerBlock /
    FluxSingleTransformerBlock forward; each line names the op that saves the tensor.
    """
    c = inv.config
    h, heads = inv.hidden, c["num_attention_heads"]
    m = 4 * h  # mlp_ratio 4
    full = inv.kind == "full"
    T = image + text
    double = unit.name.startswith("transformer_blocks")
    adapted = {n.split(".", 2)[2] for n in inv.adapted if n.startswith(unit.name + ".")}

    def trains(*subs: str) -> bool:
        return full or any(s in adapted for s in subs)

    if policy == "full":  # checkpoint inputs: the residual streams (and temb, shared rotary tables, the mask)
        return Saved(act=batch * (T * h + h + T))
    if policy == "ops":
        if double:
            per_tok = 3 * h + h + m + h  # q, k, v, to_out, ff.0, ff.2 outputs, both streams
        else:
            per_tok = m + 3 * h + h  # proj_mlp, q, k, v, proj_out
        mod = (12 if double else 3) * h  # AdaLN modulation linears' outputs
        saved = Saved(act=batch * (T * (per_tok + h + h) + mod), stat=batch * T * heads)  # + attn out, input; lse
        return saved + _adapter_extra(inv, unit.name, {"image": image, "context": text, "all": T}, batch, "ops")

    saved = Saved()
    # joint attention over T tokens: q, k, v, out (fused kernel), log-sum-exp, the (B, 1, 1, T) mask
    saved += Saved(act=4 * T * h + T, stat=T * heads)
    streams = [(image, ""), (text, "context")] if double else [(T, "single")]
    for s, which in streams:
        # AdaLayerNormZero: LayerNorm keeps its input and mean/rstd; x̂·(1+scale) keeps x̂ only when the modulation
        # trains (full); the (B, 6h) modulation output stays alive through the gates' views.
        saved += Saved(norm=s * h * (2 if full else 1), stat=2 * s, act=(6 if double else 3) * h + (h if full else 0))
        if which == "single":
            saved += Saved(act=s * h * trains("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v"))  # shared input
            saved += Saved(act=s * m)  # GELU(tanh) input
            saved += Saved(act=s * (h + m) * trains("proj_out"))  # cat([attn, mlp]) into proj_out
            saved += Saved(act=s * h * full)  # gate · proj_out(...) keeps proj_out's output for the gate's grad
        else:
            q, k, v, o = (("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0") if not which else
                          ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"))
            ff = "ff" if not which else "ff_context"
            saved += Saved(act=s * h * trains(q, k, v))  # the projections' shared input
            saved += Saved(act=s * h * trains(o))  # attention output into to_out / to_add_out
            saved += Saved(act=s * h * full)  # gate_msa · attn_output keeps attn_output (gate trains)
            saved += Saved(norm=s * h * (2 if full else 1), stat=2 * s, act=h)  # norm2: as norm1; (1+scale_mlp)
            saved += Saved(act=s * h * trains(f"{ff}.net.0.proj"))  # modulated norm2 output into ff.0
            saved += Saved(act=s * m)  # GELU(tanh) input
            saved += Saved(act=s * m * trains(f"{ff}.net.2"))  # GELU output into ff.2
            saved += Saved(act=s * h * full)  # gate_mlp · ff_output keeps ff_output
        # RMSNorm on q and k (per head): input and rstd; the normalised x̂ only when the norm's weight trains
        saved += Saved(norm=2 * s * h * (2 if full else 1), stat=2 * s * heads)
    saved = saved * batch
    return saved + _adapter_extra(inv, unit.name, {"image": image, "context": text, "all": T}, batch, "none")


def root_activations(inv: Inventory, *, image: int, text: int, batch: int) -> Saved:
    """Outside the blocks: x_embedder / context_embedder inputs (when they train), norm_out, proj_out, the loss."""
    c = inv.config
    h, full = inv.hidden, inv.kind == "full"
    out_ch = c.get("out_channels") or c["in_channels"]
    saved = Saved(act=(image * c["in_channels"] + text * c["joint_attention_dim"]) * full)
    saved += Saved(norm=image * h * (2 if full else 1), stat=2 * image, act=h)  # norm_out (AdaLayerNormContinuous)
    saved += Saved(act=image * h * full)  # proj_out input
    saved += Saved(stat=2 * image * out_ch)  # fp32 prediction and the MSE's difference
    return saved * batch


def ac_policy(cfg: JobConfig) -> str:
    """The per-block policy list's generator: none | full | ops | every_N, from the config."""
    if not cfg.train.activation_checkpointing:
        return "none"
    return cfg.parallel.ac_policy


def activation_bytes(inv: Inventory, *, image: int, text: int, batch: int, policy: str, act_bytes: int,
                     autocast: bool) -> dict[str, float]:
    """Peak activation bytes of one micro-batch: what the forward keeps, plus the backward's working set (the
    largest block recomputed in full, when blocks are checkpointed)."""
    every = int(policy.removeprefix("every_")) if policy.startswith("every_") else None
    kept = root_activations(inv, image=image, text=text, batch=batch)
    recompute = Saved()
    for i, unit in enumerate(inv.blocks):
        block_policy = policy if every is None else ("full" if i % every == 0 else "none")
        kept += block_activations(inv, unit, image=image, text=text, batch=batch, policy=block_policy)
        if block_policy != "none":
            whole = block_activations(inv, unit, image=image, text=text, batch=batch, policy="none")
            if whole.bytes(act_bytes, autocast) > recompute.bytes(act_bytes, autocast):
                recompute = whole
    # rotary cos/sin tables (T, head_dim) in fp32, shared by every block
    kept += Saved(stat=2 * (image + text) * inv.config["attention_head_dim"])
    return {"kept": kept.bytes(act_bytes, autocast), "recompute": recompute.bytes(act_bytes, autocast)}


def activation_grad_bytes(inv: Inventory, *, image: int, text: int, batch: int, act_bytes: int,
                         autocast: bool) -> float:
    """The backward's own transient, with or without checkpointing: the gradients alive while autograd runs the widest
    block. The incoming gradient of the residual stream (h wide), then, at the MLP, the gradient of proj_out's
    concatenated input (h + m) and of the GELU's input (m) — the widest set alive at once — plus the LayerNorm input's
    gradient in fp32 under autocast. They flow through frozen layers too (whatever trains upstream needs them), so
    they do not depend on the adapter. FLUX at 1024 px with 512 text tokens: about 0.34 GB per sample."""
    h = inv.hidden
    m = 4 * h  # mlp_ratio 4
    total = image + text
    widest = total if inv.config.get("num_single_layers", 0) else image  # single-stream MLPs run over every token
    return batch * (widest * (2 * h + 2 * m) * act_bytes + total * h * (4 if autocast else act_bytes))


def nccl_communicators(cfg: JobConfig, cl: Cluster) -> int:
    """NCCL communicators a rank uses: the world's (loss, barriers; FSDP2's 1-D mesh over the world reuses it) and,
    with HSDP on several nodes, the shard and replicate groups of the 2-D mesh."""
    return 3 if (cfg.parallel.backend == "fsdp2" and cfg.parallel.hsdp and cl.nodes > 1) else 1


def optimizer_temporary(cfg: JobConfig, cl: Cluster, shard_elems: int, largest_elems: int) -> tuple[str, float]:
    """AdamW's fp32 temporary at the step (train/optim.py resolves `auto` to fused on CUDA): fused none; foreach one
    sqrt(v) copy of every local tensor at once (`torch._foreach_sqrt`); single-tensor `v.sqrt() / c` per tensor, two
    copies of the largest. With CPU offload the step runs in host memory."""
    impl = cfg.optim.implementation
    if impl == "auto":  # DeepSpeed's optimizer is built while the module is still on the host: auto finds CPU tensors
        on_gpu = cl.device == "cuda" and not cfg.parallel.cpu_offload and cfg.parallel.backend == "fsdp2"
        impl = "fused" if on_gpu else "single_tensor"
    if cfg.parallel.cpu_offload:
        return impl, 0.0
    return impl, {"fused": 0.0, "foreach": 4.0 * shard_elems, "single_tensor": 8.0 * largest_elems}[impl]


# ---------------------------------------------------------------------------------------------------------------
# Memory per GPU


@dataclass(frozen=True)
class Tokens:
    image: int
    text: int

    @property
    def total(self) -> int:
        return self.image + self.text


def tokens_for(cfg: JobConfig, text_tokens: int | None = None) -> Tokens:
    """Image tokens of `data.resolution` (8× VAE, 2×2 patches) and text tokens (worst case: `max_text_tokens`)."""
    side = cfg.data.resolution // 16
    return Tokens(side * side, text_tokens if text_tokens is not None else cfg.objective.max_text_tokens)


def shard_group(cfg: JobConfig, cl: Cluster) -> int:
    """FSDP2 shards over one node with HSDP on several nodes, else over the world; ZeRO over the world."""
    if cfg.parallel.backend == "fsdp2" and cfg.parallel.hsdp and cl.nodes > 1:
        return cl.gpus_per_node
    return cl.world


def compute_dtype_bytes(cfg: JobConfig, cl: Cluster) -> int:
    if cfg.model.dtype == "auto":
        return 2 if cl.device == "cuda" else 4
    return _DTYPE_BYTES[cfg.model.dtype]


def encoders_loaded(cfg: JobConfig, precomputed: bool | None) -> bool:
    """Whether the trainer holds the VAE and text encoders. Explicit flag, else the dataset's layout when it is
    readable here (a precomputed dataset needs none), else yes (what raw data needs)."""
    if precomputed is not None:
        return not precomputed
    try:
        layout = read_layout(cfg.data) if (cfg.data.local and Path(cfg.data.local).is_dir()) else None
    except (ValueError, OSError):
        layout = None
    return not (layout is not None and layout.get("kind") == "precomputed")


def plan_family(cfg: JobConfig) -> ModelFamily:
    """The family of `model.path`, or FLUX.1's when the path is a placeholder (as `transformer_config`)."""
    readable = cfg.model.path and (Path(cfg.model.path) / "transformer" / "config.json").is_file()
    return family_of_dir(cfg.model.path) if readable else FAMILIES["flux"]


@dataclass(frozen=True)
class FrozenParts:
    """The frozen parts the trainer loads for raw data, as `model.path`'s component configs describe them."""
    params: dict[str, int]
    """Parameter counts: `t5` the family's text model (T5 for FLUX.1 and Chroma; Mistral3 for FLUX.2 [dev], Qwen3 for
    [klein]: the family table's `t5` slot, as loaded: FLUX.2's without the layers past the deepest stacked one),
    `clip` CLIP-L or 0, `vae` the VAE."""
    text_model: str
    """The text model's architecture as its config names it (T5EncoderModel, Mistral3ForConditionalGeneration, ...)."""


def frozen_parts(cfg: JobConfig) -> FrozenParts:
    """Counted on meta from `model.path`'s component configs, each read once; FLUX.1's when not readable."""
    family = plan_family(cfg)
    root = Path(cfg.model.path) if cfg.model.path else None
    parts = {"t5": family.t5[0], "clip": family.clip[0] if family.clip else None, "vae": "vae"}
    if root is None or not all((root / d / "config.json").is_file() for d in parts.values() if d):
        return FrozenParts(dict(ENCODER_PARAMS), "T5EncoderModel")
    counts, text_model = {"clip": 0}, ""
    with torch.device("meta"):
        for key in ("t5", "clip"):
            if parts[key]:
                # FLUX.2 loads its text model only up to the deepest stacked layer (train/text.py)
                config = (text_model_config(root / parts[key], family.text_layers) if key == "t5" and family.text_layers
                          else AutoConfig.from_pretrained(root / parts[key]))
                counts[key] = _numel(getattr(transformers, config.architectures[0])(config))
                text_model = text_model or config.architectures[0]
        vae_cls = getattr(diffusers, family.vae_class)
        counts["vae"] = _numel(vae_cls.from_config(vae_cls.load_config(root / "vae")))
    return FrozenParts(counts, text_model)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_bytes_on_gpu(cfg: JobConfig, cl: Cluster, encoders: dict[str, int], b: int) -> float:
    """`model.text_encoder_placement`: device = the text model (and CLIP) replicated on every GPU; cpu = they stay in
    host memory; fsdp = the text model sharded over the world (train/parallelize.py `shard_text_encoder`), CLIP
    replicated. The VAE is always on the device."""
    placement = cfg.model.text_encoder_placement
    text = {"device": encoders["t5"], "cpu": 0, "fsdp": math.ceil(encoders["t5"] / cl.world)}[placement]
    clip = 0 if placement == "cpu" else encoders["clip"]
    return (text + clip + encoders["vae"]) * b


@dataclass
class MemoryPlan:
    rows: dict[str, float]
    """Component -> bytes per GPU, in display order."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def _fsdp2_state(inv: Inventory, cfg: JobConfig, cl: Cluster, b: int, ema: bool
                 ) -> tuple[dict[str, float], list[str], tuple[int, int]]:
    """FSDP2's per-GPU weights, optimizer state, gathered blocks and comm buffers (and the teacher's): (rows, notes,
    the optimizer's (local, largest single) element counts)."""
    rows: dict[str, float] = {}
    notes: list[str] = []
    S = shard_group(cfg, cl)
    frozen = sum(u.shard_numel(u.frozen, S) for u in inv.units) * b
    train_shard = sum(u.shard_numel(u.trainable, S) for u in inv.units)
    rows["frozen base weights (sharded)"] = frozen
    if cfg.model.base_quant != "none":
        rows[f"frozen base Linears {cfg.model.base_quant} (replicated)"] = sum(
            u.quantized_bytes(b) for u in inv.units)
    rows["trainable params fp32 (sharded)"] = 4 * train_shard
    opt_elems = (train_shard, max((u.shard_numel([sh], S) for u in inv.units for sh in u.trainable), default=0))
    rows["gradients fp32 (sharded)"] = 4 * train_shard
    rows["AdamW moments fp32 (sharded)"] = 8 * train_shard
    rows["EMA fp32 (sharded)"] = 4 * train_shard * ema
    largest = max(u.n_frozen + u.n_trainable for u in inv.blocks)
    largest_train = max(u.n_trainable for u in (*inv.blocks, *inv.shared))
    root = inv.units[-1]
    root_full = (root.n_frozen + root.n_trainable) * b  # the root stays unsharded from forward to backward
    reduce_b = 4 if cfg.parallel.reduce_dtype == "fp32" else 2
    if cfg.parallel.reshard_after_forward:
        # the block computing + the one prefetched (all-gather output), plus one block's unsharded gradients
        # (compute dtype) and their reduce-scatter input (reduce dtype)
        gathered = 2 * largest * b
        # a shared module is gathered at the step's start beside the first block, and again in the backward's end
        gathered = max(gathered, (largest + max((u.n_frozen + u.n_trainable for u in inv.shared), default=0)) * b)
    else:  # every block stays gathered from its forward to its backward
        gathered = sum(u.n_frozen + u.n_trainable for u in (*inv.blocks, *inv.shared)) * b + largest * b
        notes.append("parallel.reshard_after_forward=false keeps every block gathered until its backward")
    rows["unsharded blocks + comm buffers"] = gathered + root_full + largest_train * (b + reduce_b)
    if cfg.parallel.cpu_offload:
        host = rows.pop("trainable params fp32 (sharded)") + rows.pop("gradients fp32 (sharded)") + rows.pop(
            "AdamW moments fp32 (sharded)") + rows.pop("frozen base weights (sharded)")
        notes.append(f"parallel.cpu_offload: {host / GiB:.1f} GiB of sharded state per rank lives in host memory")
    if inv.teacher:
        # sharded like the base; its root stays gathered after its forward (as the student's), its blocks are
        # gathered one at a time under no_grad while the student's are resharded (counted in the row above)
        rows["frozen teacher weights (sharded)"] = sum(u.shard_numel(u.frozen, S) for u in inv.teacher) * b
        rows["teacher root (gathered)"] = inv.teacher[-1].n_frozen * b
        if cfg.parallel.cpu_offload:
            notes.append("parallel.cpu_offload: the teacher's shards live in host memory too")
            rows.pop("frozen teacher weights (sharded)")
    return rows, notes, opt_elems


def _deepspeed_state(inv: Inventory, cfg: JobConfig, cl: Cluster, b: int, ema: bool
                     ) -> tuple[dict[str, float], list[str], tuple[int, int]]:
    """DeepSpeed ZeRO-2/3's per-GPU weights, optimizer state and buckets (and the teacher's), as `_fsdp2_state`."""
    rows: dict[str, float] = {}
    notes: list[str] = []
    W = cl.world
    n_train, n_total = inv.n_trainable, inv.n_total
    stage = cfg.parallel.zero_stage
    bucket = 5e8  # DeepSpeed's default reduce_bucket_size (elements): deepspeed_config sets none
    if stage == 2:
        rows["module weights (replicated)"] = n_total * b
    else:
        rows["module weights (partitioned)"] = math.ceil(n_total / W) * b
    rows["fp32 master of trainable (partitioned)"] = 4 * math.ceil(n_train / W)
    opt_elems = (math.ceil(n_train / W), math.ceil(n_train / W))  # ZeRO's one flat partition per group
    rows["gradients (partitioned fp32 + bf16)"] = (4 + b) * math.ceil(n_train / W)
    rows["AdamW moments fp32 (partitioned)"] = 8 * math.ceil(n_train / W)
    rows["EMA fp32"] = 4 * (n_train if stage == 2 else math.ceil(n_train / W)) * ema
    comm = 2 * min(bucket, n_train) * b  # the gradient bucket and its reduce buffer
    if stage == 3:
        comm += min(1e9, n_total) * b  # stage3_max_live_parameters (default 1e9 elements) gathered at once
    rows["comm buckets / gathered params"] = comm
    if inv.teacher:
        rows["frozen teacher weights (replicated)"] = inv.n_teacher * b
    notes.append("DeepSpeed rows follow its default bucket sizes; not measured in this repo")
    notes.append(f"a DeepSpeed checkpoint save gathers the full fp32 trainable state (12 B/param) into every "
                 f"rank's host memory: {12 * n_train * cl.gpus_per_node / GiB:.0f} GiB per node")
    return rows, notes, opt_elems


def gpu_memory(inv: Inventory, cfg: JobConfig, cl: Cluster, tok: Tokens, *, with_encoders: bool,
               encoders: dict[str, int] | None = None) -> MemoryPlan:
    """Per-GPU bytes by component for the configured backend."""
    b = compute_dtype_bytes(cfg, cl)
    autocast = cl.device == "cuda" and b == 2
    # the teacher objective runs the student on cond and uncond rows at once: twice the rows keep activations
    acts = activation_bytes(inv, image=tok.image, text=tok.text, batch=cfg.train.batch_size * inv.student_rows,
                            policy=ac_policy(cfg), act_bytes=b, autocast=autocast)
    ema = cfg.ema.decay > 0
    state = _fsdp2_state if cfg.parallel.backend == "fsdp2" else _deepspeed_state
    rows, notes, opt_elems = state(inv, cfg, cl, b, ema)
    rows["activations (kept for backward)"] = acts["kept"]
    rows["backward working set (recomputed block)"] = acts["recompute"]
    rows["activation gradients (one block's backward)"] = activation_grad_bytes(
        inv, image=tok.image, text=tok.text, batch=cfg.train.batch_size, act_bytes=b, autocast=autocast)
    if cfg.model.base_quant != "none":  # train/quant.py's backward dequantizes one Linear's weight at a time
        rows["dequantized weight (one Linear, transient)"] = max(
            (math.prod(s) for u in inv.units for s in u.quantized if len(s) == 2), default=0) * b
    impl, opt_tmp = optimizer_temporary(cfg, cl, *opt_elems)
    rows[f"AdamW {impl} step temporary fp32"] = opt_tmp
    # zero_grad(set_to_none) frees the gradients after every step, and the backward frees activations as it fills
    # gradients: the two peak at opposite ends of the backward, and the optimizer's temporary exists only at the step,
    # when the activations are gone. With grad_accum > 1 the accumulated gradient shards (FSDP2's partial sum under
    # HSDP) live on through the next micro-batches' activations: only the temporary is credited then.
    grads = next(v for k, v in rows.items() if k.startswith("gradients"))
    at_step = opt_tmp + (grads if cfg.train.grad_accum == 1 else 0.0)
    rows["step and backward peaks not at once"] = 0.0 - min(at_step, acts["kept"])
    if cfg.train.grad_accum > 1:
        notes.append("train.grad_accum > 1: the accumulated gradients stay alive through the next micro-batch's "
                     "activations (counted together)")
    rows["frozen encoders (text model, CLIP, VAE)"] = (
        encoder_bytes_on_gpu(cfg, cl, encoders or ENCODER_PARAMS, b) if with_encoders else 0.0)
    k = nccl_communicators(cfg, cl)
    rows[f"CUDA context + NCCL ({k} communicator{'s' if k > 1 else ''})"] = (
        NCCL_RUNTIME_BYTES[min(k, 3)] if cl.device == "cuda" else 0.0)
    return MemoryPlan(rows, notes)


# ---------------------------------------------------------------------------------------------------------------
# Host memory, checkpoint, FLOPs and communication


def host_ram_at_load(inv: Inventory, cfg: JobConfig, cl: Cluster, *, with_encoders: bool,
                     encoders: dict[str, int] | None = None) -> float:
    """Peak host bytes per node while the ranks load the transformer. Each rank reads the full state dict into RAM
    and casts the trainable part to fp32 before sharding — except under FSDP2, whose sharded loader
    (`train/parallel/load.py`) has each rank read only its own shard."""
    b = compute_dtype_bytes(cfg, cl)
    if cfg.parallel.backend == "fsdp2":
        S = shard_group(cfg, cl)
        # the shards themselves land on the GPU (in host RAM only for CPU runs); one unit's rows are in flight; a
        # new adapter's initial values are held (fp32, whole) until its shards are filled
        shards = sum(u.shard_numel(u.frozen, S) * b + u.shard_numel(u.trainable, S) * 4 + u.quantized_bytes(b)
                     for u in inv.units)
        per_rank = shards * (cl.device != "cuda") + max(u.n_frozen + u.n_trainable for u in inv.units) * 4
        per_rank += inv.n_trainable * 4 * (inv.kind != "full")
    else:
        per_rank = inv.n_total * b + inv.n_trainable * 4
    enc = sum((encoders or ENCODER_PARAMS).values()) * b * with_encoders  # from_pretrained goes through host RAM
    return cl.gpus_per_node * (per_rank + enc)


def checkpoint_bytes(inv: Inventory, cfg: JobConfig) -> float:
    """One DCP checkpoint: fp32 trainable parameters, two AdamW moments, the EMA (frozen weights are not saved)."""
    return inv.n_trainable * 4 * (3 + (cfg.ema.decay > 0))


def step_flops(inv: Inventory, cfg: JobConfig, tok: Tokens) -> float:
    """Model FLOPs of one optimizer step on one GPU (train/mfu.py's convention; recomputation not counted). The
    teacher objective adds the student's uncond rows (forward and backward) and one teacher forward (a third of a
    full fine-tune's forward + backward)."""
    student = inv.flops.per_step(image_tokens=tok.image, text_tokens=tok.text,
                                 batch=cfg.train.batch_size * inv.student_rows, full=cfg.model.adapter.kind == "full")
    teacher = inv.flops.per_step(image_tokens=tok.image, text_tokens=tok.text, batch=cfg.train.batch_size,
                                 full=True) / 3 if inv.teacher else 0.0
    return cfg.train.grad_accum * (student + teacher)


@dataclass(frozen=True)
class Comm:
    """Bytes one GPU sends per optimizer step, by collective, and the link each crosses."""

    all_gather: float
    reduce_scatter: float
    all_reduce: float
    """HSDP's cross-replica all-reduce of the gradient shards, once per optimizer step."""
    shard_group: int
    replicas: int
    intra_node: bool
    """True when the shard group fits in a node (all-gather and reduce-scatter stay on NVLink)."""
    all_gather_backward: float = 0.0
    """Of `all_gather`, the bytes gathered again in the backward (`reshard_after_forward`)."""
    all_gather_at_step: float = 0.0
    """Of `all_gather`, the bytes gathered after the optimizer step (ZeRO-2's updated weights): nothing hides them."""
    calls: tuple[int, int, int] = (0, 0, 0)
    """Collectives per optimizer step (all-gathers, reduce-scatters, all-reduces): each pays the ring's latency."""
    unit: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The largest block's all-gather, reduce-scatter and all-reduce bytes: what the pipeline cannot hide at its ends
    (the first block's gather before any compute, the last unit's reduction after the last)."""

    @property
    def total(self) -> float:
        return self.all_gather + self.reduce_scatter + self.all_reduce


def comm_per_step(inv: Inventory, cfg: JobConfig, cl: Cluster) -> Comm:
    """Per-GPU bytes of one step's FSDP2/HSDP collectives (ring algorithms: each rank sends (n-1)/n of the buffer).

    Per micro-batch: forward all-gather of every unit in the compute dtype; a second all-gather of every block in
    the backward when `reshard_after_forward` (the root is never resharded); a reduce-scatter of every unit's
    trainable gradients in `reduce_dtype`. Per step with HSDP: an all-reduce of the gradient shards across replicas,
    once (`FSDP2Backend.prepare_micro_batch` defers it to the last micro-batch;
    tests/integration/test_hsdp_accum.py counts it).
    DeepSpeed is modelled as ZeRO-2 (reduce-scatter gradients, all-gather updated weights) or ZeRO-3 (like FSDP).
    """
    b = compute_dtype_bytes(cfg, cl)
    rb = 4 if cfg.parallel.reduce_dtype == "fp32" else 2
    micro = cfg.train.grad_accum
    if cfg.parallel.backend == "deepspeed":
        W = cl.world
        f = (W - 1) / W
        intra = W <= cl.gpus_per_node
        rs = micro * inv.n_trainable * rb * f
        if cfg.parallel.zero_stage == 2:  # grads reduce-scattered each micro-batch; trained weights all-gathered
            ag = inv.n_trainable * b * f
            return Comm(ag, rs, 0.0, W, 1, intra, all_gather_at_step=ag, calls=(1, micro, 0))
        ag = micro * 2 * inv.n_total * b * f
        return Comm(ag, rs, 0.0, W, 1, intra, all_gather_backward=ag / 2,
                    calls=(2 * micro * len(inv.units), micro * len(inv.units), 0))
    S = shard_group(cfg, cl)
    R = cl.world // S
    f = (S - 1) / S
    ag = ag_back = rs = 0.0
    n_ag = n_rs = 0
    for u in inv.units:  # FSDP2's buffers: every parameter's dim 0 padded to a multiple of S
        gathered = S * (u.shard_numel(u.frozen, S) + u.shard_numel(u.trainable, S)) * b
        again = cfg.parallel.reshard_after_forward and u.name != "root"
        ag += (2 if again else 1) * gathered * f
        ag_back += gathered * f * again
        rs += S * u.shard_numel(u.trainable, S) * rb * f
        n_ag += 1 + again
        n_rs += u.n_trainable > 0
    # the teacher: one all-gather of each of its units per micro-batch (forward only, nothing to reduce)
    ag += sum(S * u.shard_numel(u.frozen, S) * b * f for u in inv.teacher)
    n_ag += len(inv.teacher)
    ring_ar = 2 * (R - 1) / R if R > 1 else 0.0
    ar = ring_ar * sum(u.shard_numel(u.trainable, S) for u in inv.units) * rb
    big = max(inv.blocks, key=lambda u: u.n_frozen + u.n_trainable)
    unit = (S * (big.shard_numel(big.frozen, S) + big.shard_numel(big.trainable, S)) * b * f,
            S * big.shard_numel(big.trainable, S) * rb * f, ring_ar * big.shard_numel(big.trainable, S) * rb)
    return Comm(micro * ag, micro * rs, ar, S, R, S <= cl.gpus_per_node, all_gather_backward=micro * ag_back,
                calls=(micro * n_ag, micro * n_rs, n_rs if R > 1 else 0), unit=unit)


@dataclass(frozen=True)
class Timing:
    compute_s: float
    """Forward, backward and recompute kernels of every micro-batch, at `Cluster.mfu` of the peak."""
    comm_s: float
    """Every collective of the step at the link rates, as if nothing overlapped."""
    exposed_s: float
    """What the step waits for beyond its compute: communication a phase cannot hide (the first gather, the last
    reduction, whatever exceeds the phase's compute) and the compute NCCL's SMs slow down."""
    recompute_s: float = 0.0
    phases: tuple[tuple[str, float, float], ...] = ()
    """(phase, compute s, communication s) per step: forward, backward (with recompute), after the step."""

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s


def link_rates(cl: Cluster) -> tuple[float, float]:
    """(NVLink, InfiniBand) bytes/s, one way, per GPU and per NIC."""
    return cl.nvlink_gbs * 1e9, cl.ib_gbits / 8 * 1e9


def sharded_collective_s(nbytes: float, cl: Cluster, intra_node: bool) -> float:
    """Seconds of an all-gather or reduce-scatter in which each rank sends `nbytes` (ring factor included).

    In a node: NVLink's bus bandwidth. Across nodes NCCL runs one ring per NIC: of each ring's hops only those that
    leave a node cross InfiniBand, so a node's G NICs together carry about the (n-1)/n of the buffer that one GPU
    sends, and the other (G-1)/G of the hops stay on NVLink; the slower of the two legs bounds the ring."""
    nvlink, ib = link_rates(cl)
    if intra_node:
        return nbytes / nvlink
    g = cl.gpus_per_node
    return max(nbytes * (g - 1) / g / nvlink, nbytes / (g * ib))


def _overlapped(compute: float, comm: float, sm_share: float) -> float:
    """A phase whose compute and communication run together: NCCL's kernels take `sm_share` of the SMs while they
    run, so the compute stretches by that share of the overlap; the phase lasts as long as the longer of the two."""
    return max(comm, compute + sm_share * min(comm, compute))


def step_timing(inv: Inventory, cfg: JobConfig, cl: Cluster, tok: Tokens) -> Timing:
    """A per-phase model of one optimizer step (each micro-batch: forward, then backward with its recompute).

    - forward: hides only the forward all-gathers; the first block's gather runs before any compute;
    - backward: hides the backward all-gathers, the reduce-scatters and (last micro-batch, HSDP) the all-reduce, on
      its own compute plus the recompute of checkpointed blocks; the last unit's reduce-scatter and all-reduce are a
      tail after the last compute. The all-reduce crosses InfiniBand while the reduce-scatter uses NVLink: the two
      legs run side by side;
    - after the step: ZeRO-2's all-gather of the updated weights, hidden behind nothing.
    Every collective pays `ring_step_us` per ring step. Not modelled: stragglers, data loading, the optimizer kernel.
    """
    rate = cl.peak_tflops * 1e12 * cl.mfu
    micro = cfg.train.grad_accum
    total = step_flops(inv, cfg, tok) / micro  # one micro-batch, forward + backward
    fl = inv.flops
    forward = cfg.train.batch_size * (2 * fl.p_tok * tok.total + 4 * fl.layers * tok.total ** 2 * fl.hidden)
    policy = ac_policy(cfg)
    recomputed = {"none": 0.0, "full": 1.0, "ops": 0.0}.get(
        policy, 1.0 / int(policy.removeprefix("every_")) if policy.startswith("every_") else 0.0)
    c_fwd, c_bwd, c_rec = forward / rate, (total - forward) / rate, recomputed * forward / rate

    c = comm_per_step(inv, cfg, cl)
    _, ib = link_rates(cl)
    alpha = cl.ring_step_us * 1e-6
    S, R = c.shard_group, c.replicas
    n_ag, n_rs, n_ar = c.calls
    back_share = c.all_gather_backward / c.all_gather if c.all_gather else 0.0
    calls_back = round(n_ag * back_share) if cfg.parallel.backend == "fsdp2" else n_ag // 2 * bool(back_share)
    lat_ag, lat_ar = (S - 1) * alpha, 2 * (R - 1) * alpha
    ag_step = sharded_collective_s(c.all_gather_at_step, cl, c.intra_node)
    ag_fwd = sharded_collective_s(c.all_gather - c.all_gather_backward - c.all_gather_at_step, cl, c.intra_node)
    ag_fwd = ag_fwd / micro + (n_ag - calls_back - bool(ag_step)) / micro * lat_ag
    ag_bwd = sharded_collective_s(c.all_gather_backward, cl, c.intra_node) / micro + calls_back / micro * lat_ag
    rs = sharded_collective_s(c.reduce_scatter, cl, c.intra_node) / micro + n_rs / micro * lat_ag
    ar = c.all_reduce / ib + n_ar * lat_ar if R > 1 else 0.0
    first = sharded_collective_s(c.unit[0], cl, c.intra_node) + lat_ag
    share = cl.nccl_sms / H100_SMS

    fwd = first + _overlapped(c_fwd, max(0.0, ag_fwd - first), share)
    tail = sharded_collective_s(c.unit[1], cl, c.intra_node) + lat_ag
    bwd = tail + _overlapped(c_bwd + c_rec, max(0.0, ag_bwd + rs - tail), share)
    tail_ar = (c.unit[2] / ib + lat_ar) if R > 1 else 0.0
    last_bwd = tail + tail_ar + _overlapped(c_bwd + c_rec, max(0.0, max(ag_bwd + rs, ar) - tail - tail_ar), share)
    step = micro * fwd + (micro - 1) * bwd + last_bwd + ag_step
    compute = micro * (c_fwd + c_bwd + c_rec)
    comm = micro * (ag_fwd + ag_bwd + rs) + ar + ag_step
    phases = (("forward", micro * c_fwd, micro * ag_fwd),
              ("backward + recompute", micro * (c_bwd + c_rec), micro * (ag_bwd + rs) + ar),
              ("after the optimizer step", 0.0, ag_step))
    return Timing(compute, comm, step - compute, micro * c_rec, phases)


# ---------------------------------------------------------------------------------------------------------------
# The plan and its verdict


@dataclass
class Plan:
    cfg: JobConfig
    cluster: Cluster
    source: str
    inv: Inventory
    tokens: Tokens
    with_encoders: bool
    encoders: dict[str, int]
    memory: MemoryPlan
    host_bytes: float
    ckpt_bytes: float
    flops: float
    comm: Comm
    timing: Timing
    verdict: str
    text_model: str = "T5EncoderModel"


def make_plan(cfg: JobConfig, cl: Cluster, *, text_tokens: int | None = None,
              precomputed: bool | None = None, inv: Inventory | None = None) -> Plan:
    """The whole plan; pass `inv` (from an earlier plan of the same model and adapter) to skip the meta build."""
    config, source = transformer_config(cfg)
    inv = inv or inventory(config, cfg)
    tok = tokens_for(cfg, text_tokens)
    with_enc = encoders_loaded(cfg, precomputed)
    frozen = frozen_parts(cfg)
    enc = frozen.params
    mem = gpu_memory(inv, cfg, cl, tok, with_encoders=with_enc, encoders=enc)
    host = host_ram_at_load(inv, cfg, cl, with_encoders=with_enc, encoders=enc)
    plan = Plan(cfg, cl, source, inv, tok, with_enc, enc, mem, host, checkpoint_bytes(inv, cfg),
                step_flops(inv, cfg, tok), comm_per_step(inv, cfg, cl), step_timing(inv, cfg, cl, tok), "")
    plan.verdict = verdict(plan)
    plan.text_model = frozen.text_model
    return plan


def _fits(p: Plan) -> bool:
    return p.memory.total <= USABLE_FRACTION * p.cluster.gpu_mem_gib * GiB


def verdict(p: Plan) -> str:
    """"fits", or "does not fit: <the knob to turn>" — the first knob (cheapest first) that makes it fit."""
    cl = p.cluster
    problems = []
    if p.host_bytes > cl.host_mem_gib * GiB:
        problems.append(f"host RAM at load {p.host_bytes / GiB:.0f} GiB > --host-mem-gib {cl.host_mem_gib:g}")
    if _fits(p) and not problems:
        return "fits"
    if not _fits(p):
        knob = _knob(p)
        problems.insert(0, f"{p.memory.total / GiB:.1f} GiB per GPU > {USABLE_FRACTION:.0%} of {cl.gpu_mem_gib:g} GiB"
                        + (f"; {knob}" if knob else ""))
    return "does not fit: " + "; ".join(problems)


def _knob(p: Plan) -> str:
    """Try the usual knobs one at a time, cheapest first; name the first that fits."""

    cfg, cl = p.cfg, p.cluster

    def trial(mutate=None, cluster=None) -> bool:
        c = copy.deepcopy(cfg)
        if mutate:
            mutate(c)
        q = Plan(c, cluster or cl, p.source, p.inv if c.model.adapter.kind == cfg.model.adapter.kind else
                 inventory(p.inv.config, c), p.tokens, p.with_encoders, p.encoders, MemoryPlan({}), 0, 0, 0, p.comm,
                 p.timing, "")
        q.memory = gpu_memory(q.inv, c, q.cluster, p.tokens, with_encoders=p.with_encoders, encoders=p.encoders)
        return _fits(q)

    if p.with_encoders:
        q = copy.copy(p)
        q.memory = gpu_memory(p.inv, cfg, cl, p.tokens, with_encoders=False, encoders=p.encoders)
        if _fits(q):
            return "precompute the data (`dedistill data precompute`): the encoders then stay off the GPU"
        if cfg.model.text_encoder_placement == "device":
            for where in ("fsdp", "cpu"):
                def place(c, where=where):
                    c.model.text_encoder_placement = where
                if trial(place):
                    return f"set model.text_encoder_placement={where} (or precompute the data)"
    if not cfg.train.activation_checkpointing:
        def ac(c):
            c.train.activation_checkpointing = True
            c.parallel.ac_policy = "full"
        if trial(ac):
            return "set train.activation_checkpointing=true"
    if cfg.train.batch_size > 1:
        for bs in range(cfg.train.batch_size - 1, 0, -1):
            def smaller(c, bs=bs):
                c.train.batch_size = bs
                c.train.grad_accum = cfg.train.grad_accum * math.ceil(cfg.train.batch_size / bs)
            if trial(smaller):
                accum = cfg.train.grad_accum * math.ceil(cfg.train.batch_size / bs)
                return (f"set train.batch_size={bs} and train.grad_accum={accum} to keep the global batch (the "
                        f"all-gathers and reduce-scatters then run {accum} times per step; the HSDP all-reduce once)")
    if cfg.parallel.backend == "fsdp2" and not cfg.parallel.reshard_after_forward:
        def reshard(c):
            c.parallel.reshard_after_forward = True
        if trial(reshard):
            return "set parallel.reshard_after_forward=true"
    if cfg.parallel.backend == "fsdp2" and cfg.parallel.hsdp and cl.nodes > 1:
        def no_hsdp(c):
            c.parallel.hsdp = False
        if trial(no_hsdp):
            return "set parallel.hsdp=false (shard over all GPUs, not one node)"
    if cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 2:
        def z3(c):
            c.parallel.zero_stage = 3
        if trial(z3):
            return "set parallel.zero_stage=3"
    for gpus in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if gpus <= cl.world:
            continue
        per_node = min(gpus, max(cl.gpus_per_node, 8))  # fill a node (8 GPUs) before adding nodes
        bigger = Cluster(**{**cl.__dict__, "nodes": gpus // per_node, "gpus_per_node": per_node})
        if trial(cluster=bigger):
            return f"use {gpus} GPUs (--nodes {bigger.nodes} --gpus-per-node {per_node})"
    if cfg.model.adapter.kind == "full":
        def lora(c):
            c.model.adapter.kind = "lora"
            c.model.adapter.rank = 16
        if trial(lora):
            return "train an adapter instead of the full model: model.adapter.kind=lora"
    return "no single knob suffices (lower data.resolution or use GPUs with more memory)"


# ---------------------------------------------------------------------------------------------------------------
# Text output


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def _text_model_lines(p: Plan) -> list[str]:
    """Where the family's text model can run: FLUX.2 [dev]'s 24B Mistral3 does not fit beside a training on one card
    whole, so the plan sizes each way the code offers (train/build.py `load_text_encoder`, dataset_tools/precompute)."""
    b = compute_dtype_bytes(p.cfg, p.cluster)
    n = p.encoders["t5"]
    dtype = {2: "bf16", 4: "fp32"}[b]
    return [
        "",
        f"text model {p.text_model}, {_count(n)} parameters loaded = {n * b / GiB:.2f} GiB in {dtype} per copy",
        f"           raw data (model.text_encoder_placement): device = a whole copy on every GPU; fsdp = "
        f"{math.ceil(n / p.cluster.world) * b / GiB:.2f} GiB per GPU (1/{p.cluster.world}); cpu = host RAM, none on "
        f"the GPU",
        "           precomputed data: `dedistill data precompute` runs one copy per GPU, as an array job over many "
        "GPUs (docs/data.md); the trainer then loads no text model",
    ]


def format_plan(p: Plan) -> str:
    cl, cfg, inv = p.cluster, p.cfg, p.inv
    S = shard_group(cfg, cl)
    backend = cfg.parallel.backend if cfg.parallel.backend == "fsdp2" else f"deepspeed ZeRO-{cfg.parallel.zero_stage}"
    if cfg.parallel.backend == "fsdp2" and S != cl.world:
        backend += f" HSDP ({cl.world // S} replicas × {S})"
    lines = [
        f"model      {p.source}",
        f"           {_count(inv.n_total)} parameters, {_count(inv.n_trainable)} trainable "
        f"({cfg.model.adapter.kind}); {len(inv.blocks)} blocks, hidden {inv.hidden}",
        f"cluster    {cl.nodes} node(s) × {cl.gpus_per_node} GPU(s) of {cl.gpu_mem_gib:g} GiB, {backend}, "
        f"shard group {S}",
        f"step       batch {cfg.train.batch_size}/GPU × grad_accum {cfg.train.grad_accum}, {cfg.data.resolution} px "
        f"= {p.tokens.image} image + {p.tokens.text} text tokens, AC {ac_policy(cfg)}",
        "",
        "per GPU",
    ]
    for name, val in p.memory.rows.items():
        lines.append(f"  {name:42s} {_gib(val)}")
    lines.append(f"  {'total':42s} {_gib(p.memory.total)}   (card {cl.gpu_mem_gib:g} GiB)")
    margin = (1 - USABLE_FRACTION) * cl.gpu_mem_gib
    lines.append(f"  margin: the verdict keeps {1 - USABLE_FRACTION:.0%} of the card ({margin:.1f} GiB) free beyond "
                 f"these rows, for allocator fragmentation")
    for note in p.memory.notes:
        lines.append(f"  note: {note}")
    if not p.with_encoders:
        lines.append("  note: precomputed data: VAE and text encoders not loaded")
    lines += _text_model_lines(p)
    c, t = p.comm, p.timing
    link = "NVLink" if c.intra_node else "NVLink + InfiniBand ring"
    nvlink, ib = link_rates(cl)
    phases = "; ".join(f"{name} {comp * 1e3:.0f} ms compute vs {comm * 1e3:.0f} ms comm"
                       for name, comp, comm in t.phases if comp or comm)
    lines += [
        "",
        f"host RAM per node at load   {_gib(p.host_bytes)}   (have {cl.host_mem_gib:g} GiB)",
        f"checkpoint on disk          {_gib(p.ckpt_bytes)}",
        f"FLOPs per step per GPU      {p.flops:.3e}  -> {(t.compute_s - t.recompute_s) * 1e3:.0f} ms at "
        f"{cl.mfu:.0%} MFU of {cl.peak_tflops:g} TFLOP/s (+ {t.recompute_s * 1e3:.0f} ms recompute)",
        f"comm per step per GPU       all-gather {c.all_gather / 1e9:.2f} GB + reduce-scatter "
        f"{c.reduce_scatter / 1e9:.2f} GB ({link}, per micro-batch)"
        + (f" + all-reduce {c.all_reduce / 1e9:.2f} GB (InfiniBand, once per step)" if c.all_reduce else "")
        + f"; {sum(c.calls)} collectives = {t.comm_s * 1e3:.0f} ms unoverlapped",
        f"time per step (modelled)    {phases}",
        f"step time (modelled)        {t.step_s * 1e3:.0f} ms = compute {t.compute_s * 1e3:.0f} ms (recompute "
        f"{t.recompute_s * 1e3:.0f}) + exposed {t.exposed_s * 1e3:.0f} ms; efficiency = compute / step: "
        f"{t.compute_s / t.step_s:.0%}",
        "",
        "basis      counted from the model's shapes and the code: state, buffers, activations (checked on CPU), "
        "comm bytes",
        f"           modelled, not measured on a GPU: activation gradients, CUDA context + NCCL (NVIDIA/nccl#864), "
        f"step time at {cl.mfu:.0%} of {cl.peak_tflops:g} TFLOP/s,",
        f"           NVLink {nvlink / 1e9:g} GB/s one way (NCCL bus bandwidth; 450 nominal), InfiniBand "
        f"{ib / 1e9:g} GB/s per NIC one way, {cl.gpus_per_node} NICs per node, {cl.ring_step_us:g} us per ring "
        f"step, NCCL on {cl.nccl_sms} of {H100_SMS} SMs",
        "",
        f"verdict: {p.verdict}",
    ]
    return "\n".join(lines)
