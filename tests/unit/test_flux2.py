# tier: unit
"""FLUX.2 [dev] and [klein] on tiny local pipelines (`dedistill tiny-model --family flux2 | flux2-klein`): the family
rows, the stock pipelines load them, our ids / text features / latent normalisation equal the pipelines', and the
masked velocity equals the truncated-prompt velocity (the reference test every family has)."""

import diffusers
import pytest
import torch

from train.adapters import target_module_names
from train.config import AdapterConfig
from train.family import FAMILIES, family_of_dir, family_of_model
from train.flux import image_ids, pack_latents, predict_velocity
from train.flux2 import call_flux2, flux2_ids, normalise_packed
from train.model import check_model_dir, load_transformer
from train.text import PromptEmbeds, TextEncoder

PIPELINES = {"flux2": "Flux2Pipeline", "flux2-klein": "Flux2KleinPipeline"}
PROMPTS = ["a red circle", "a small blue square at the top left on a yellow background"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.linear_in", "ff_context.linear_out",
           "to_qkv_mlp_proj"]


@pytest.fixture(scope="module", params=["flux2", "flux2-klein"])
def model_dir(request, tmp_path_factory):
    from dataset_tools.tiny_model import write_tiny_model

    return request.param, write_tiny_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param)


@pytest.fixture(scope="module")
def loaded(model_dir):
    name, path = model_dir
    m = load_transformer(path, dtype=torch.float32)
    text = TextEncoder(path, dtype=torch.float32, device=torch.device("cpu"))
    return name, path, m, text


def _latents(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 32, 8, 8, generator=g)
    return pack_latents(z), torch.rand(batch, generator=g), image_ids(8, 8, device="cpu", dtype=torch.float32)


def test_family_row_and_stock_pipeline_load(model_dir):
    name, path = model_dir
    assert family_of_dir(path) is FAMILIES[name]
    assert check_model_dir(path) == path
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(path))
    assert pipe.transformer.config.guidance_embeds == (name == "flux2")
    assert not torch.equal(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))
    ours = load_transformer(path, dtype=torch.float32, guidance="keep")
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # model.guidance: bypass (the default) builds [dev] without its guidance embedder, [klein] (none) as it is
    bypassed = load_transformer(path, dtype=torch.float32).state_dict()
    dropped = {k for k in pipe.transformer.state_dict() if k not in bypassed}
    assert bool(dropped) == (name == "flux2")
    assert all(k.startswith("time_guidance_embed.guidance_embedder.") for k in dropped), dropped


def test_ids_equal_the_pipeline_ids():
    img4, txt4 = flux2_ids(image_ids(8, 6, device="cpu", dtype=torch.float32), 5)
    lat = torch.zeros(1, 128, 4, 3)
    assert torch.equal(img4, diffusers.Flux2Pipeline._prepare_latent_ids(lat)[0].float())
    assert torch.equal(txt4, diffusers.Flux2Pipeline._prepare_text_ids(torch.zeros(1, 5, 8))[0].float())


def test_packing_and_normalisation_equal_the_pipeline(loaded):
    _, path, _, _ = loaded
    vae = diffusers.AutoencoderKLFlux2.from_pretrained(str(path / "vae"))
    z = torch.randn(2, 32, 8, 6)
    p = diffusers.Flux2Pipeline._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    ref = diffusers.Flux2Pipeline._pack_latents((p - mean) / std)
    torch.testing.assert_close(normalise_packed(vae, pack_latents(z)), ref, atol=1e-6, rtol=0)


def test_text_features_equal_the_pipeline(loaded):
    """Unmasked, our stacked features are the stock pipeline's for the same prompts and length."""
    name, path, _, text = loaded
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(path))
    ref = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=160)[0]
    ours = text.encode(PROMPTS, max_tokens=160, masked=False)
    assert ours.t5.shape == ref.shape
    torch.testing.assert_close(ours.t5, ref, atol=1e-5, rtol=0)
    # masked: the real rows are the same, the pads are zero, and a prompt's states do not depend on the padding
    masked = text.encode(PROMPTS, max_tokens=160)
    short = text.encode(PROMPTS, max_tokens=max(masked.lengths))
    torch.testing.assert_close(masked.pad_to(short.t5.shape[1]).t5, short.t5, atol=1e-5, rtol=0)


def test_masked_velocity_equals_truncated_prompt(loaded):
    _, _, m, text = loaded
    x, t, ids = _latents()
    enc = text.encode(PROMPTS, max_tokens=160)
    # Padding rows hold garbage on purpose: a correct mask makes their values irrelevant.
    pads = ~enc.mask[..., None]
    garbage = PromptEmbeds(torch.where(pads, 5 * torch.randn_like(enc.t5), enc.t5), enc.mask, enc.pooled, enc.lengths)
    with torch.no_grad():
        out = predict_velocity(m, x, t, garbage, ids, masked=True)
        for i in range(len(PROMPTS)):
            one = enc.select(torch.tensor([i])).trimmed()
            assert one.unpadded
            ref = predict_velocity(m, x[i:i + 1], t[i:i + 1], one, ids, masked=True)
            assert ref.abs().mean() > 1e-3
            torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)
        unmasked = predict_velocity(m, x, t, garbage, ids, masked=False)
    assert (unmasked - out).abs().max() > 1e-3


def test_our_call_equals_the_pipeline_call(loaded):
    """The stock call (pipeline ids, no mask, guidance None) gives what predict_velocity gives without a mask."""
    _, _, m, text = loaded
    x, t, ids = _latents()
    enc = text.encode(PROMPTS, max_tokens=40, masked=False)
    with torch.no_grad():
        ours = predict_velocity(m, x, t, enc, ids, masked=False)
        ref = m(hidden_states=x, timestep=t, encoder_hidden_states=enc.t5, guidance=None, return_dict=False,
                img_ids=diffusers.Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 128, 4, 4)).float(),
                txt_ids=diffusers.Flux2Pipeline._prepare_text_ids(enc.t5).float())[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_guidance_embedder_is_out_of_the_graph(loaded):
    """[dev]: our default load (`model.guidance: bypass`) has no guidance embedder, and equals the stock model called
    without guidance, whose embedder is then out of the graph (its weights change nothing); given a guidance it is
    in."""
    name, path, m, text = loaded
    assert m.time_guidance_embed.guidance_embedder is None  # bypassed ([dev]) or absent ([klein])
    if name != "flux2":
        return
    raw = diffusers.Flux2Transformer2DModel.from_pretrained(str(path / "transformer"), torch_dtype=torch.float32)
    x, t, ids = _latents()
    enc = text.encode(PROMPTS, max_tokens=40)
    img4, txt4 = flux2_ids(ids, enc.t5.shape[1])
    kw = dict(x=x, t=t, t5=enc.t5, pooled=enc.pooled, key_mask=None, img_ids=ids, txt_ids=txt4)
    with torch.no_grad():
        ref = call_flux2(raw, **kw)
        ours = call_flux2(m, **kw)
        guided = call_flux2(raw, **kw, guidance=torch.full((2,), 3.5))
        for p in raw.time_guidance_embed.guidance_embedder.parameters():
            p.mul_(3.0)
        out = call_flux2(raw, **kw)
    assert torch.equal(out, ref)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert (guided - ref).abs().max() > 1e-4


def test_blocks_modulation_and_adapter_targets_come_from_the_table(loaded):
    name, _, m, _ = loaded
    fam = family_of_model(m)
    assert fam.block_lists == FAMILIES[name].block_lists and fam.transformer_class == FAMILIES[name].transformer_class
    assert set(FAMILIES[name].block_classes) == {type(b).__name__ for b in fam.blocks(m)}
    for sub in FAMILIES[name].shared_modules:
        assert not any(sub in n for n, _ in fam.blocks(m)[0].named_modules())  # outside the blocks
        assert m.get_submodule(sub).linear.bias is None
    names = target_module_names(m, AdapterConfig(kind="lora", target_modules=TARGETS))
    assert "single_transformer_blocks.1.attn.to_qkv_mlp_proj" in names
    assert "transformer_blocks.0.ff_context.linear_out" in names
    with pytest.raises(ValueError, match=r"'ff.net.0.proj' matches no module .* in a flux2 transformer"):
        target_module_names(m, AdapterConfig(kind="lora", target_modules=["to_q", "ff.net.0.proj"]))


@pytest.mark.parametrize("name", ["flux2", "flux2-klein"])
def test_text_model_past_the_deepest_stacked_layer_is_not_loaded(name, tmp_path):
    """A text model deeper than the stacked layers (as the real Mistral3's 40 and Qwen3's 36 are) is loaded one layer
    past the deepest read one, and its features still equal the stock pipeline's, which runs every layer."""
    import shutil

    import transformers

    from dataset_tools.tiny_model import write_tiny_model

    path = write_tiny_model(tmp_path / "model", family=name)
    enc_dir = path / FAMILIES[name].t5[0]
    config = transformers.AutoConfig.from_pretrained(enc_dir)
    deep = config.get_text_config()
    deep.num_hidden_layers = max(FAMILIES[name].text_layers) + 4
    if getattr(deep, "layer_types", None):
        deep.layer_types = ["full_attention"] * deep.num_hidden_layers
    torch.manual_seed(1)
    deeper = getattr(transformers, config.architectures[0])(config)
    shutil.rmtree(enc_dir)
    deeper.save_pretrained(enc_dir)

    text = TextEncoder(path, dtype=torch.float32, device=torch.device("cpu"))
    kept = text.t5.config.get_text_config().num_hidden_layers
    assert kept == max(FAMILIES[name].text_layers) + 1
    assert len(text.t5.get_submodule(FAMILIES[name].text_blocks)) == kept
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(path))
    assert pipe.text_encoder.config.get_text_config().num_hidden_layers == kept + 3
    ref = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=160)[0]
    torch.testing.assert_close(text.encode(PROMPTS, max_tokens=160, masked=False).t5, ref, atol=1e-5, rtol=0)
