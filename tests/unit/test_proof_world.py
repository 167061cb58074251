"""The proof's world settings (`world.*`, dataset_tools/tiny_data.WorldSpec): which stages they reach and which they
leave alone, in process (the stages themselves run in tests/system/test_proof_smoke.py)."""

import pytest

from dataset_tools.tiny_data import BACKGROUND_COLOURS, OBJECT_COLOURS
from evals.experiments.proof import held_out_world, load_proof_config, stage_settings, vae_world


def test_world_settings_reach_every_stage_that_reads_the_world():
    """`world.*` (dataset_tools/tiny_data.WorldSpec) is part of the world, VAE and teacher records, not the judge's
    (it learns the default world, which holds every other one's samples); the default world adds no key, so the
    stages.json of runs made before it existed stay valid. The eval prompts follow the world."""
    default = ["world.objects=[1,1,2,3]", "world.palettes=shared", "vae.objects=null"]  # the shipped toy's before issue 22
    base = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=default))
    assert "world" not in base["world"]
    over = [*default, "world.objects=[1]", "world.palettes=split", "eval.n_prompts=16"]
    split = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=over))
    assert split["world"]["world"] == {"objects": [1], "palettes": "split"}
    assert split["judge"] == base["judge"]
    for stage in ("vae", "pipeline", "teacher", "distill"):
        assert split[stage] != base[stage], stage
    world = held_out_world(load_proof_config("configs/proof-cpu.yaml", overrides=over))
    assert len(world["eval"]) == 16
    for prompt, (_, attrs) in zip(world["eval_prompts"], world["eval"]):
        assert attrs["objects"][0]["colour"] in OBJECT_COLOURS and attrs["background"] in BACKGROUND_COLOURS
        assert prompt.endswith(f"{attrs['background']} background")
    with pytest.raises(ValueError, match=r"^world.objects: \[2, 3\] has no single-object samples"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["world.objects=[2,3]"])


def test_vae_objects_draw_the_vae_images_only():
    """`vae.objects` sets the object counts of the VAE's training images alone: it is part of the VAE's record (and so of
    every stage after it) but not the world's, whose data and eval prompts stay the world's own; unset, it adds no
    key, so older VAE records stay valid. A count outside 1-3 is a one-line error naming the key."""
    over = ["world.objects=[1]", "world.palettes=split", "vae.objects=null"]
    one = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=over))
    assert "objects" not in one["vae"]["vae"]
    mixed = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=[*over, "vae.objects=[1,1,2,3]"]))
    assert mixed["vae"]["vae"]["objects"] == [1, 1, 2, 3]
    assert mixed["world"] == one["world"] and mixed["judge"] == one["judge"]
    assert mixed["vae"] != one["vae"] and mixed["pipeline"] != one["pipeline"] and mixed["teacher"] != one["teacher"]
    cfg = load_proof_config("configs/proof-cpu.yaml", overrides=[*over, "vae.objects=[1,1,2,3]"])
    assert vae_world(cfg).objects == [1, 1, 2, 3] and vae_world(cfg).palettes == "split"
    assert cfg.world.objects == [1]
    with pytest.raises(ValueError, match=r"^vae.objects: counts must be 1, 2 or 3 \(at least one\), got \[4\]$"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["vae.objects=[4]"])


def test_text_and_model_settings_reach_the_pipeline_not_the_vae():
    """`text.*` (dataset_tools/tiny_model.ToyText) and `model.*` build the pipeline stage (text encoders, a fresh
    transformer around the trained VAE), so they are part of its record and of every stage after it, and not of the
    world's, the judge's or the VAE's: a VAE is reused when only they change. The tiny model's encoders add no key. A
    bad value is a one-line error naming the key."""
    base = stage_settings(load_proof_config("configs/proof-cpu.yaml"))
    assert "text" not in base["pipeline"] and base["pipeline"]["vae"] == base["vae"]
    over = ["text.width=128", "text.mixing=false", "text.state_norm=3"]
    toy = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=over))
    assert toy["pipeline"]["text"] == {"width": 128, "mixing": False, "state_norm": 3.0}
    wide = stage_settings(load_proof_config("configs/proof-cpu.yaml", overrides=["model.num_layers=3"]))
    for other in (toy, wide):
        assert {k: other[k] for k in ("world", "judge", "vae")} == {k: base[k] for k in ("world", "judge", "vae")}
        for stage in ("pipeline", "teacher", "distill"):
            assert other[stage] != base[stage], stage
    with pytest.raises(ValueError, match=r"^text.width: 30 must be a multiple of 4, at least 8$"):
        load_proof_config("configs/proof-cpu.yaml", overrides=["text.width=30"])


@pytest.mark.parametrize("preset", ["toy-schnell", "proof-cpu", "proof-dev-cpu", "proof-gpu"])
def test_presets_draw_the_rebuilt_world(preset):
    """Issue 22 part 2: every toy preset draws the world the ablations chose (docs/proof.md): split palettes (a colour
    word names one role) and one object per image (nothing to bind across objects), its VAE trained on three objects
    per image (a one-object VAE lost shape), and a transformer of hidden 128 (hidden 64 did not bind colour or size)."""
    cfg = load_proof_config(f"configs/{preset}.yaml")
    assert cfg.world.palettes == "split" and cfg.world.objects == [1]
    assert cfg.vae.objects == [3] and vae_world(cfg).palettes == "split"
    assert cfg.model.num_attention_heads * cfg.model.attention_head_dim == 128
