"""`dedistill prune`: FLUX -> diffusers' ChromaTransformer2DModel / ChromaPipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tiny_nets import tiny_transformer

REPO = Path(__file__).resolve().parents[2]
SCHNELL = REPO / "configs" / "models" / "flux1-schnell" / "transformer" / "config.json"


def test_parameter_counts_at_flux1_size_on_meta():
    """11.9B -> about 8.9B: the 3.3B of modulation Linears and embedders go, a 0.3B approximator comes."""
    from tools.prune import chroma_config, modulation_count, parameter_counts

    config = json.loads(SCHNELL.read_text())
    c = parameter_counts(config)
    assert round(c["flux"] / 1e9, 1) == 11.9
    assert round(c["chroma"] / 1e9, 1) == 8.9
    assert round(c["dropped"] / 1e9, 1) == 3.3
    assert c["chroma"] == c["flux"] - c["dropped"] + c["approximator"]
    # the weight map covers FLUX.1's real keys and shapes (on meta: names and shapes only)
    from train.model import build_transformer_meta
    from tools.prune import build_chroma_meta, transfer_state

    state, dropped = transfer_state(build_transformer_meta(config).state_dict(),
                                    build_chroma_meta(chroma_config(config)))
    # weight + bias of 2 Linears per double block, 1 per single block, norm_out; 4 Linears in the two embedders
    assert len(dropped) == 2 * (2 * 19 + 38 + 1) + 2 * 4
    chroma = chroma_config(config)
    assert chroma["approximator_hidden_dim"] == 5120 and modulation_count(chroma) == 344  # Chroma's own numbers
    # diffusers' default ChromaTransformer2DModel arguments are Chroma1's: the derived config must equal them
    import inspect

    from diffusers import ChromaTransformer2DModel

    defaults = {k: p.default for k, p in inspect.signature(ChromaTransformer2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for key, value in defaults.items():
        got = chroma[key]
        assert (list(got) if isinstance(got, (tuple, list)) else got) == (
            list(value) if isinstance(value, (tuple, list)) else value), key


def _pruned(seed: int = 0):
    from tools.prune import prune_transformer

    flux = tiny_transformer(seed)
    chroma, dropped = prune_transformer(flux, seed=seed)
    return flux, chroma.eval(), dropped


def _inputs(flux, b: int = 3, seed: int = 1):
    from train.flux import image_ids

    g = torch.Generator().manual_seed(seed)
    cfg = flux.config
    x = torch.randn(b, 16, cfg.in_channels, generator=g)
    t5 = torch.randn(b, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    t = torch.rand(b, generator=g)
    return x, t5, pooled, t, image_ids(8, 8, device="cpu", dtype=torch.float32)


def test_chroma_with_flux_modulation_is_flux():
    """Every copied weight sits where Chroma reads it, and the modulation index order (single blocks, double image,
    double text, final shift/scale) is Chroma's: fed FLUX's own modulation, the Chroma forward is FLUX's."""
    from tools.prune import ForcedModulation, ModulationTarget, chroma_velocity

    flux, chroma, dropped = _pruned()
    x, t5, pooled, t, ids = _inputs(flux)
    txt_ids = torch.zeros(t5.shape[1], 3)
    with torch.no_grad():
        v_flux = flux(hidden_states=x, encoder_hidden_states=t5, pooled_projections=pooled, timestep=t,
                      img_ids=ids, txt_ids=txt_ids, return_dict=False)[0]
        target = ModulationTarget(flux, pooled)
        table = target.for_captions(t, target.embed_pooled(pooled))
        with ForcedModulation(chroma, table):
            v = chroma_velocity(chroma, x, t, t5, ids)
        v_approx = chroma_velocity(chroma, x, t, t5, ids)  # the unfitted approximator: not FLUX
    assert (v - v_flux).abs().max().item() < 1e-5 * v_flux.abs().max().item()
    assert (v_approx - v_flux).abs().max().item() > 1e-2 * v_flux.abs().max().item()
    assert all(k.startswith(("time_text_embed.", "norm_out.linear.")) or ".norm" in k for k in dropped)
    # the blocks are FLUX's tensors, not copies of them
    assert chroma.transformer_blocks[0].attn.to_q.weight.data_ptr() == \
        flux.transformer_blocks[0].attn.to_q.weight.data_ptr()


def test_caption_mean_target_is_the_average_of_the_captions():
    """mean(t) uses E[W silu(.) + b] = W E[silu(.)] + b; check it against averaging each caption's modulation."""
    from tools.prune import ModulationTarget

    flux = tiny_transformer(0)
    pooled = torch.randn(7, flux.config.pooled_projection_dim, generator=torch.Generator().manual_seed(3))
    target = ModulationTarget(flux, pooled, chunk=3)  # chunks that do not divide 7
    t = torch.tensor([0.05, 0.5, 0.97])
    emb = target.embed_pooled(pooled)
    brute = torch.stack([target.for_captions(t, emb[i].expand(3, -1)) for i in range(7)]).mean(0)
    assert torch.allclose(target.mean(t), brute, atol=1e-6)


def test_transfer_refuses_a_weight_with_no_place():
    from tools.prune import build_chroma_meta, chroma_config, transfer_state

    flux = tiny_transformer(0)
    state = flux.state_dict()
    chroma = build_chroma_meta(chroma_config(dict(flux.config)))
    transfer_state(state, chroma)  # the real one maps
    with pytest.raises(ValueError, match="no place in Chroma"):
        transfer_state({**state, "controlnet_x_embedder.weight": torch.zeros(1)}, chroma)
    del state["x_embedder.weight"]
    with pytest.raises(ValueError, match="do not fill"):
        transfer_state(state, chroma)


def test_guidance_distilled_flux_prunes_like_schnell():
    from tools.prune import DROPPED, chroma_config

    schnell = json.loads(SCHNELL.read_text())
    assert chroma_config({**schnell, "guidance_embeds": True}) == chroma_config(schnell)
    assert DROPPED.match("time_text_embed.guidance_embedder.linear_1.weight")  # the embedder goes with the rest


def test_fit_is_seeded_and_learns():
    from tools.prune import FitSettings, ModulationTarget, approximator_output, fit_approximator

    runs = []
    for _ in range(2):
        flux, chroma, _ = _pruned()
        pooled = torch.randn(5, flux.config.pooled_projection_dim, generator=torch.Generator().manual_seed(4))
        target = ModulationTarget(flux, pooled)
        t = torch.linspace(0.01, 0.99, 16)
        before = (approximator_output(chroma, t) - target.mean(t)).pow(2).mean().item()
        losses = fit_approximator(chroma, target, FitSettings(steps=60, batch_size=8, lr=3e-3, warmup=5))
        after = (approximator_output(chroma, t) - target.mean(t)).pow(2).mean().item()
        runs.append((losses, after))
        assert after < 0.1 * before
    assert runs[0][0] == runs[1][0]  # bitwise the same losses for the same seed


@pytest.mark.slow
def test_prune_cli_loads_in_chroma_pipeline(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """The command end to end on the tiny pipeline: the report (finite, the bound below), the pipeline dir that
    diffusers' own ChromaPipeline loads and runs, and the pruned weights inside it."""
    from diffusers import ChromaPipeline

    from launch.cli import main
    from train.model import load_transformer

    out = tmp_path / "chroma"
    main(["prune", "--model", str(tiny_model_dir), "--captions", str(tiny_data_dir), "--out", str(out),
          "--steps", "300", "--lr", "2e-3", "--batch-size", "16", "--eval-prompts", "4", "--eval-timesteps", "4",
          "--eval-resolution", "64"])
    printed = capsys.readouterr().out
    assert "velocity vs FLUX" in printed and "approximator: rel error" in printed

    report = json.loads((out / "prune_report.json").read_text())
    a, v = report["approximator"], report["velocity"]
    for x in (a["rel_error"], a["caption_spread_rel"], v["rel_error"], v["exact_mean_rel_error"]):
        assert math.isfinite(x)
    # Measured on this tiny model (docs/recipes.md): approximator 0.21, velocity 0.054 (0.025 with the exact caption
    # mean). The approximator plateaus there whatever its width: its 8 timestep frequencies cannot follow the 128 a
    # random FLUX timestep embedder mixes; the velocity error is what the pruned model starts from.
    assert a["rel_error"] < 0.35
    assert v["rel_error"] < 0.1
    assert v["exact_mean_rel_error"] < v["rel_error"]
    assert report["parameters"]["chroma"] < report["parameters"]["flux"]

    assert not (out / "text_encoder_2").exists() and not (out / "tokenizer_2").exists()
    pipe = ChromaPipeline.from_pretrained(str(out))
    assert type(pipe.transformer).__name__ == "ChromaTransformer2DModel"
    flux = load_transformer(tiny_model_dir, dtype=torch.float32)
    assert torch.equal(pipe.transformer.x_embedder.weight, flux.x_embedder.weight)
    assert torch.equal(pipe.transformer.single_transformer_blocks[1].proj_out.weight,
                       flux.single_transformer_blocks[1].proj_out.weight)
    image = pipe("a red circle", num_inference_steps=1, height=64, width=64, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()

    # the pruned dir is what configs/chroma.yaml starts from: the trainer reads it as the chroma family and trains
    import tiny_runs
    from train.config import load_config
    from train.family import family_of_dir

    assert family_of_dir(out).name == "chroma"
    cfg = load_config(tiny_runs.CONFIG, [f"model.path={out}", f"data.local={tiny_data_dir}", f"run_dir={tmp_path / 'run'}",
                                         "train.max_steps=2", "train.progress_bar=false", "sample.at_end=false"])
    state = tiny_runs.train_in_process(cfg)
    assert state.step == 2 and all(math.isfinite(r["loss"]) for r in state.history)


def test_prune_refuses_before_work(tiny_model_dir, tmp_path):
    from tools.prune_pipeline import run_prune

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    captions = tmp_path / "caps.txt"
    captions.write_text("a red circle\na blue square\n")
    with pytest.raises(ValueError, match="not empty"):
        run_prune(tiny_model_dir, out, captions, eval_prompts=1)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="need more than --eval-prompts"):
        run_prune(tiny_model_dir, tmp_path / "new", captions, eval_prompts=2)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_refused(tiny_model_dir, tmp_path):
    from tools.prune_pipeline import run_prune

    captions = tmp_path / "caps.txt"
    captions.write_text("a red circle\na blue square\n")
    with pytest.raises(ValueError, match="--device"):
        run_prune(tiny_model_dir, tmp_path / "out", captions, eval_prompts=1, device="cuda")
    assert not (tmp_path / "out").exists()


def test_cli_defaults_are_the_library_defaults():
    """What a user who types no optional flag gets is what the library (and so these tests) run."""
    import argparse
    import dataclasses
    import inspect

    from launch.cli import _load_extensions, build_parser
    from tools.prune_pipeline import run_prune
    from tools.prune import FitSettings

    _load_extensions()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    cli = {a.dest: a.default for a in sub._actions if a.option_strings and a.dest != "help"}
    lib = {f.name: f.default for f in dataclasses.fields(FitSettings)}
    lib.update({k: p.default for k, p in inspect.signature(run_prune).parameters.items()
                if p.default is not p.empty and k not in ("fit", "log")})
    shared = set(cli) & set(lib)
    assert shared >= {"steps", "batch_size", "lr", "seed", "eval_prompts", "eval_timesteps", "eval_resolution",
                      "approximator_hidden", "device", "dtype", "max_text_tokens"}
    assert {k: cli[k] for k in shared} == {k: lib[k] for k in shared}


def test_captions_default_to_the_shipped_set():
    """`dedistill prune --model FLUX_DIR --out DIR` (DESIGN.md's contract) works as typed: with no --captions the fit
    averages over the caption set shipped in the package, enough of them to hold out --eval-prompts."""
    import argparse

    from launch.cli import _load_extensions, build_parser
    from launch.prune import DEFAULT_CAPTIONS
    from tools.prune_pipeline import read_captions, split_captions

    _load_extensions()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    a = sub.parse_args(["--model", "m", "--out", "o"])
    assert a.captions == str(DEFAULT_CAPTIONS)
    caps = read_captions(a.captions)
    assert len(caps) == 120 and not any(c.startswith("#") for c in caps)
    fit, held = split_captions(caps, a.eval_prompts, a.seed)
    assert len(held) == a.eval_prompts and len(fit) == 120 - a.eval_prompts
