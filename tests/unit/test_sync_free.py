"""The step with no host syncs: the device runs ahead of the host between read steps.

- On CPU the losses and grad norms of a job that reads the device every few steps are exactly those of the same job
  read at every step (the sync-per-step loop), both computed here: floats recorded on another machine would differ
  in their last bits where that machine's CPU kernels round differently (AVX-512/AMX).
- A skipped non-finite step leaves the parameters, the optimizer state and the EMA bitwise as they were, for both
  AdamW kernels the loop uses on CPU: single_tensor (the host reads the flag) and fused (the flag stays on the device).
- Trimming and the dropout swap read host lengths only (meta tensors stand in for a device the host must not read).
- The stop-flag all-reduce and the history reads happen only at read steps (`train.sync_every`, logging, checkpoints).
- On a GPU: under `torch.cuda.set_sync_debug_mode("error")` a whole training step (device generator, forward,
  backward, clip, fused AdamW with a skipped step) raises on no sync.
"""

import pytest
import torch


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from dataset_tools.tiny_data import write_tiny_data
    from dataset_tools.tiny_model import write_tiny_model

    base = tmp_path_factory.mktemp("sync")
    return write_tiny_model(base / "model", seed=0), write_tiny_data(base / "data", n=32, size=64, seed=0)


def _cfg(model, data, run, **over):
    from train.config import load_config

    items = {"model.path": model, "data.local": data, "run_dir": run, "train.max_steps": 5,
             "train.progress_bar": False, "sample.at_end": False, "checkpoint.every_steps": 5, "train.log_every": 1,
             "ema.decay": 0.5, "optim.warmup_steps": 1, **over}
    return load_config("configs/tiny-cpu.yaml", [f"{k}={v}" for k, v in items.items()])


def test_cpu_losses_equal_the_sync_per_step_loop_of_main(small, tmp_path):
    """5 steps of tiny-cpu.yaml on 32 samples, grad_accum 2, caption dropout 0.5: read every 3 steps, and the
    reference read at every step with the optimizer's skip decided on the host, compared for equality."""
    import tiny_runs

    job = {"train.grad_accum": 2, "objective.caption_dropout": 0.5}
    state = tiny_runs.train_in_process(_cfg(*small, tmp_path / "run", **job, **{"train.sync_every": 3}))
    ref = tiny_runs.train_in_process(_cfg(*small, tmp_path / "ref", **job, **{
        "train.sync_every": 1, "optim.implementation": "single_tensor"}))
    assert [h["step"] for h in ref.history] == [1, 2, 3, 4, 5]
    assert len({h["loss"] for h in ref.history}) == 5  # five different batches and draws: the equality has teeth
    assert [h["loss"] for h in state.history] == [h["loss"] for h in ref.history]
    assert [h["grad_norm"] for h in state.history] == [h["grad_norm"] for h in ref.history]


@pytest.mark.parametrize("implementation", ["single_tensor", "fused"])
def test_skipped_step_leaves_params_optimizer_state_and_ema_bitwise(small, tmp_path, monkeypatch, implementation):
    """Step 3's batch is NaN: the checkpoint after step 3 holds exactly the tensors of the one after step 2."""
    import tiny_runs
    import train.trainer as trainer

    real = trainer.forward_backward_step
    calls = {"n": 0}

    def poisoned(transformer, batch, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            batch = {**batch, "pixels": batch["pixels"] * float("nan")}
        return real(transformer, batch, *a, **kw)

    monkeypatch.setattr(trainer, "forward_backward_step", poisoned)
    run = tmp_path / "run"
    state = tiny_runs.train_in_process(_cfg(*small, run, **{
        "train.max_steps": 4, "checkpoint.every_steps": 1, "checkpoint.keep_last": 10, "train.log_every": 4,
        "train.sync_every": 4, "optim.implementation": implementation}))
    assert state.skipped_steps == 1 and state.step == 4
    before, after = tiny_runs.trainable_state(tiny_runs.ckpt(run, 2)), tiny_runs.trainable_state(tiny_runs.ckpt(run, 3))
    moved = tiny_runs.trainable_state(tiny_runs.ckpt(run, 4))
    kept = [k for k in before if k.startswith(("model.", "optim.state.", "ema."))]
    assert any(".step" in k for k in kept) and any("exp_avg_sq" in k for k in kept) and any("ema." in k for k in kept)
    for k in kept:
        assert torch.equal(before[k], after[k]), f"{k} changed in the skipped step"
    assert any(not torch.equal(after[k], moved[k]) for k in kept if k.startswith("model."))
    assert int(after["train.skipped_steps"]) == 1 and int(after["train.step"]) == 3


def test_trimming_and_dropout_read_no_device_tensor():
    """Meta tensors have no values: any read of the mask (a sync on a GPU) would raise here."""
    from train.text import PromptEmbeds

    def on_meta(lengths, width):
        b = len(lengths)
        return PromptEmbeds(torch.empty(b, width, 8, device="meta"), torch.empty(b, width, dtype=torch.bool,
                            device="meta"), torch.empty(b, 4, device="meta"), lengths)

    enc, empty = on_meta((3, 5, 2), 9), on_meta((1,), 4)
    drop = torch.tensor([False, True, False])  # on the host, as the step draws it
    prompts = enc.where(drop, empty).select(torch.tensor([0, 1, 2])).trimmed()
    assert prompts.lengths == (3, 1, 2) and prompts.t5.shape == (3, 3, 8) and prompts.mask.shape == (3, 3)
    assert not prompts.unpadded


def test_the_stop_flag_is_agreed_only_at_read_steps(small, tmp_path, monkeypatch):
    import tiny_runs
    import train.trainer as trainer

    seen = []
    real = trainer.StopFlag.agreed
    monkeypatch.setattr(trainer.StopFlag, "agreed", lambda self, device: seen.append(1) or real(self, device))
    steps = []
    real_fb = trainer.forward_backward_step
    monkeypatch.setattr(trainer, "forward_backward_step", lambda *a, **kw: steps.append(1) or real_fb(*a, **kw))
    state = tiny_runs.train_in_process(_cfg(*small, tmp_path / "run", **{
        "train.max_steps": 7, "train.sync_every": 3, "train.log_every": 100, "checkpoint.every_steps": 100}))
    assert len(steps) == 7 and len(seen) == 3  # steps 3, 6 and the last, 7
    assert [h["step"] for h in state.history] == list(range(1, 8))  # every step's record, read in windows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_makes_no_host_sync_on_gpu():
    """forward_backward_step + clip + fused AdamW (with a skipped step) on the tiny transformer: no host sync from
    our code (a sync inside diffusers' own forward is printed with its site, as `bench/train_step.py --sync-debug`
    reports it, and does not fail this test)."""
    import warnings
    from pathlib import Path

    from dataset_tools.tiny_model import TINY_SIZES
    from diffusers import FluxTransformer2DModel

    from train.adapters import apply_adapter, trainable_named_parameters
    from train.config import AdapterConfig, ObjectiveConfig, OptimConfig
    from train.trainer import step_generator
    from train.optim import build_optimizer, step_if
    from train.step import Encoders, forward_backward_step

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_SIZES["tiny"]["transformer"]).to(dev)
    apply_adapter(model, AdapterConfig(kind="lora", rank=4, alpha=4.0))
    params = [p for _, p in trainable_named_parameters(model)]
    for p in params:
        p.data = p.data.float()
    opt = build_optimizer(params, OptimConfig(lr=1e-3))
    assert opt.defaults.get("fused")
    obj = ObjectiveConfig(timestep_sampler="beta", caption_dropout=0.5, max_text_tokens=16)
    c, d_t5, d_clip = model.config.in_channels // 4, model.config.joint_attention_dim, model.config.pooled_projection_dim
    lengths = [3, 7]
    batch = {  # a precomputed batch as the loader's collate builds it, on the host
        "caption": ["a", "b"], "latent_mean": torch.randn(2, c, 8, 8), "latent_std": torch.rand(2, c, 8, 8),
        "t5": torch.randn(2, 7, d_t5), "t5_mask": torch.arange(7)[None] < torch.tensor(lengths)[:, None],
        "pooled": torch.randn(2, d_clip), "empty_t5": torch.randn(1, 1, d_t5),
        "empty_mask": torch.ones(1, 1, dtype=torch.bool), "empty_pooled": torch.randn(1, d_clip),
        "max_text_tokens": 16,
    }
    frozen = Encoders(vae=None, text=None, dtype=torch.float32, device=dev)

    def step(i: int, poison: bool) -> None:
        b = {**batch, "latent_mean": batch["latent_mean"] * (float("nan") if poison else 1.0)}
        out = forward_backward_step(model, b, frozen, obj, generator=step_generator(0, 0, i, 0, device=dev))
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        step_if(opt, torch.isfinite(norm) & torch.isfinite(out["loss"]))
        opt.zero_grad(set_to_none=True)

    step(0, False)  # warm-up: lazy optimizer state, cuBLAS handles
    torch.cuda.synchronize()
    snap = [p.detach().clone() for p in params]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(1, True)  # skipped on the device
            skipped = [p.detach().clone() for p in params]
            step(2, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    repo = str(Path(__file__).resolve().parents[2])
    print("host syncs:", sites or "none")
    assert not [s for s in sites if s.startswith(repo)], sites
    assert all(torch.equal(a, b) for a, b in zip(snap, skipped))
    assert any(not torch.equal(a, p) for a, p in zip(snap, params))
