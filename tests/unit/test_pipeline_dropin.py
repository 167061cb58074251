# tier: unit
"""The exported `pipeline.py` is a drop-in for diffusers' FluxPipeline / ChromaPipeline (0.39).

diffusers' own fast tests (tests/pipelines/flux/test_pipeline_flux.py::FluxPipelineFastTests,
tests/pipelines/chroma/test_pipeline_chroma.py::ChromaPipelineFastTests, most checks inherited from
tests/pipelines/test_pipelines_common.py::PipelineTesterMixin) are not installed with the wheel and download their
tokenizers from the hub, so the checks that apply are restated here, on the tiny FLUX and tiny Chroma, each naming the
diffusers test it mirrors. Same assertions and tolerances unless a comment says why it is stricter.
"""

import importlib.util
import inspect
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TEMPLATES = Path(__file__).resolve().parents[2] / "launch" / "templates"
RES, STEPS, TOKENS = 32, 2, 48  # diffusers' dummy inputs: 2 steps, max_sequence_length 48
PROMPT = "A painting of a squirrel eating a burger"


def _module(family: str):
    name = {"flux": "masked_flux_pipeline.py", "chroma": "masked_chroma_pipeline.py"}[family]
    spec = importlib.util.spec_from_file_location(f"exported_{family}_pipeline", TEMPLATES / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", params=["flux", "chroma"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(family, request):
    mod = _module(family)
    cls = mod.DedistillFluxPipeline if family == "flux" else mod.DedistillChromaPipeline
    model = request.getfixturevalue("tiny_model_dir" if family == "flux" else "tiny_chroma_dir")
    p = cls.from_pretrained(str(model), torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    p.model_dir = model
    return p


def inputs(**kw):
    """get_dummy_inputs of the diffusers tests, at the tiny model's smallest size."""
    return {"prompt": PROMPT, "generator": torch.Generator().manual_seed(0), "num_inference_steps": STEPS,
            "height": RES, "width": RES, "max_sequence_length": TOKENS, "output_type": "np", **kw}


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------------- call conventions


def test_call_signature_has_the_stock_pipelines_arguments(pipe, family):
    """PipelineTesterMixin.test_pipeline_call_signature (params + required_optional_params of the Flux/Chroma fast
    tests), and stricter: every argument of the stock __call__ but the IP-Adapter ones is taken."""
    from diffusers import ChromaPipeline, FluxPipeline

    ours = inspect.signature(type(pipe).__call__).parameters
    stock = inspect.signature((FluxPipeline if family == "flux" else ChromaPipeline).__call__).parameters
    params = {"prompt", "height", "width", "guidance_scale", "prompt_embeds"}
    params |= {"pooled_prompt_embeds"} if family == "flux" else {"prompt_attention_mask"}
    assert params <= set(ours)
    for name in ("num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                 "return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs"):
        assert ours[name].default is not inspect.Parameter.empty, name
    assert {k for k in stock if "ip_adapter" not in k} <= set(ours)
    assert {"true_cfg_scale", "negative_prompt", "cfg_skip_steps", "cfg_rescale", "noise_temperature",
            "mask_text_padding", "prompt_attention_mask", "negative_prompt_attention_mask"} <= set(ours)


def test_output_types(pipe):
    """np: float32 in [0, 1], stacked (B, H, W, 3); pt: (B, 3, H, W), the same values; pil: a list of images, the np
    image rounded as dedistill sample rounds; latent: packed (B, N, C*4). Mirrors the output conventions every
    diffusers fast test relies on (get_dummy_inputs' output_type="np", test_callback_inputs' "latent")."""
    out = {t: pipe(**inputs(output_type=t)).images for t in ("np", "pt", "pil", "latent")}
    assert isinstance(out["np"], np.ndarray) and out["np"].dtype == np.float32 and out["np"].shape == (1, RES, RES, 3)
    assert 0.0 <= out["np"].min() and out["np"].max() <= 1.0 and out["np"].std() > 0
    assert torch.is_tensor(out["pt"]) and out["pt"].shape == (1, 3, RES, RES)
    assert np.array_equal(out["pt"].permute(0, 2, 3, 1).numpy(), out["np"])
    assert isinstance(out["pil"], list) and isinstance(out["pil"][0], Image.Image)
    assert out["pil"][0].size == (RES, RES)
    assert np.abs((out["np"][0] * 255).round() - np.asarray(out["pil"][0]).astype(np.float32)).max() <= 1
    channels = pipe.transformer.config.in_channels
    assert out["latent"].shape == (1, (RES // pipe.vae_scale_factor // 2) ** 2, channels)


def test_dict_tuple_outputs_equivalent(pipe):
    """PipelineTesterMixin.test_dict_tuple_outputs_equivalent (max diff 1e-4; here exact)."""
    assert np.array_equal(pipe(**inputs()).images, pipe(**inputs(), return_dict=False)[0])


def test_image_output_shape_rounds_down(pipe):
    """FluxPipelineFastTests.test_flux_image_output_shape / ChromaPipelineFastTests.test_chroma_image_output_shape:
    sizes that are not multiples of 2 * vae_scale_factor are rounded down, as the stock pipelines do."""
    step = pipe.vae_scale_factor * 2
    for height, width in [(2 * step, 2 * step), (5 * step - 3, 4 * step - 7)]:
        image = pipe(**inputs(height=height, width=width)).images[0]
        assert image.shape[:2] == (height - height % step, width - width % step)


def test_num_images_per_prompt(pipe):
    """PipelineTesterMixin.test_num_images_per_prompt, and stricter: the n images of one prompt are the images of
    the prompt repeated n times (same generators)."""
    for batch in (1, 2):
        for n in (1, 2):
            images = pipe(**inputs(prompt=[PROMPT] * batch), num_images_per_prompt=n).images
            assert images.shape[0] == batch * n
    a = pipe(**inputs(prompt=["a red circle", "a blue square"], generator=gens(0, 1, 2, 3)),
             num_images_per_prompt=2).images
    b = pipe(**inputs(prompt=["a red circle"] * 2 + ["a blue square"] * 2, generator=gens(0, 1, 2, 3))).images
    assert np.abs(a - b).max() < 1e-4 and np.abs(a[0] - a[2]).max() > 1e-3


def test_inference_batch_single_identical(pipe):
    """PipelineTesterMixin.test_inference_batch_single_identical (batch 3, prompts of unequal length, the last very
    long; image 0 of the batch equals the single image within 1e-4) and test_inference_batch_consistent."""
    single = pipe(**inputs(generator=gens(0)[0])).images
    prompts = [PROMPT[: len(PROMPT) // i] for i in range(1, 4)]
    prompts[-1] = 100 * "very long"
    batch = pipe(**inputs(prompt=prompts, generator=gens(0, 1, 2))).images
    assert batch.shape[0] == 3
    assert np.abs(batch[0] - single[0]).max() < 1e-4


def test_different_prompts_and_true_cfg_change_the_image(pipe, family):
    """FluxPipelineFastTests.test_flux_different_prompts (prompt_2 reaches T5) and test_flux_true_cfg."""
    base = pipe(**inputs(true_cfg_scale=1.0)).images[0]
    cfg = pipe(**inputs(negative_prompt="bad quality", true_cfg_scale=2.0)).images[0]
    assert not np.allclose(base, cfg)
    if family == "flux":
        other = pipe(**inputs(true_cfg_scale=1.0, prompt_2="a different prompt")).images[0]
        assert np.abs(base - other).max() > 1e-6


def test_guidance_scale(pipe, family):
    """PipelineTesterMixin.test_cfg (guidance 1.0 and 7.5 give images of one shape), and what guidance_scale means:
    FLUX without a guidance embedder ignores it, as FluxPipeline does; for Chroma it is the CFG scale, as in
    ChromaPipeline, and true_cfg_scale is its alias."""
    one = pipe(**inputs(guidance_scale=1.0)).images
    other = pipe(**inputs(guidance_scale=7.5)).images
    assert one.shape == other.shape
    if family == "flux":
        assert not pipe.transformer.config.guidance_embeds and np.array_equal(one, other)
    else:
        assert not np.allclose(one, other)
        assert np.array_equal(other, pipe(**inputs(true_cfg_scale=7.5, guidance_scale=1.0)).images)


def test_negative_embeds_shape_check(pipe, family):
    """FluxPipelineFastTests.test_flux_negative_embeds_shape_check (FLUX only: ChromaPipeline has no such check)."""
    if family != "flux":
        pytest.skip("ChromaPipeline has no such check")
    d = pipe.transformer.config.joint_attention_dim
    p = pipe.transformer.config.pooled_projection_dim
    base = dict(prompt_embeds=torch.randn(1, 4, d), pooled_prompt_embeds=torch.randn(1, p),
                negative_prompt_embeds=torch.randn(1, 5, d), negative_pooled_prompt_embeds=torch.randn(1, p),
                height=RES, width=RES, num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="must have the same shape when passed directly"):
        pipe(**base, true_cfg_scale=2.0, generator=gens(0)[0])
    pipe(**base, true_cfg_scale=1.0, generator=gens(0)[0])


def test_sigmas(pipe):
    """`sigmas` as in FluxPipeline/ChromaPipeline (retrieve_timesteps): the default equals passing
    np.linspace(1, 1/n, n); other sigmas give another image and set num_timesteps."""
    default = pipe(**inputs()).images
    assert np.array_equal(default, pipe(**inputs(sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)))).images)
    other = pipe(**inputs(sigmas=[1.0, 0.6, 0.2])).images
    assert pipe.num_timesteps == 3 and not np.allclose(default, other)


# ------------------------------------------------------------------------------------------------- embeddings


def test_encode_prompt_works_in_isolation(pipe, family):
    """PipelineTesterMixin.test_encode_prompt_works_in_isolation: encode_prompt on a pipeline holding only the text
    encoders, its outputs passed by name to a pipeline without them, gives the image of the prompt (here exact:
    1e-4 in diffusers), with real CFG on: the negative's embeddings are passed too (Chroma's CFG is on by default,
    as in ChromaPipeline)."""
    components = pipe.components
    text = type(pipe)(**{k: v if "text" in k or "tokenizer" in k else None for k, v in components.items()})
    bare = type(pipe)(**{k: None if "text" in k or "tokenizer" in k else v for k, v in components.items()})
    bare.set_progress_bar_config(disable=True)
    want = pipe(**inputs(negative_prompt="bad quality", true_cfg_scale=3.0)).images
    kw = {k: v for k, v in inputs(true_cfg_scale=3.0).items() if k != "prompt"}
    if family == "flux":
        pe, pooled, _ = text.encode_prompt(PROMPT, max_sequence_length=TOKENS)
        ne, npooled, _ = text.encode_prompt("bad quality", max_sequence_length=TOKENS)
        got = bare(**kw, prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne,
                   negative_pooled_prompt_embeds=npooled).images
    else:
        pe, _, pm, ne, _, nm = text.encode_prompt(PROMPT, negative_prompt="bad quality", max_sequence_length=TOKENS)
        got = bare(**kw, prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                   negative_prompt_attention_mask=nm).images
    assert np.array_equal(got, want)


def test_prompt_embeds_carry_their_mask(pipe, family):
    """The T5 mask of passed embeddings: given as prompt_attention_mask (ChromaPipeline's name), or read back from
    encode_prompt's zero padding rows; both give the prompt's image. Embeddings from the stock pipeline's
    encode_prompt (unmasked T5, every row kept) are taken as they are."""
    from diffusers import ChromaPipeline, FluxPipeline

    want = pipe(**inputs()).images

    def kw():
        return {k: v for k, v in inputs().items() if k != "prompt"}  # a fresh generator for each call

    if family == "flux":
        pe, pooled, _ = pipe.encode_prompt(PROMPT, max_sequence_length=TOKENS)
        ne, npooled, _ = pipe.encode_prompt("", max_sequence_length=TOKENS)
        mask = (pe != 0).any(-1)
        assert 0 < mask.sum() < mask.numel()  # padding rows are zero
        both = dict(pooled_prompt_embeds=pooled, negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled)
        assert np.array_equal(pipe(**kw(), prompt_embeds=pe, **both).images, want)
        assert np.array_equal(pipe(**kw(), prompt_embeds=pe, prompt_attention_mask=mask, **both).images, want)
        stock = FluxPipeline(**pipe.components)
        spe, spooled, _ = stock.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=TOKENS)
        assert pipe(**kw(), prompt_embeds=spe, pooled_prompt_embeds=spooled).images.shape == want.shape
    else:
        pe, _, pm, _, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                                max_sequence_length=TOKENS)
        assert pm.dtype == torch.bool and np.array_equal(pipe(**kw(), prompt_embeds=pe).images, want)
        assert np.array_equal(pipe(**kw(), prompt_embeds=pe, prompt_attention_mask=pm).images, want)
        stock = ChromaPipeline(**pipe.components)
        spe, _, spm, _, _, _ = stock.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                                   max_sequence_length=TOKENS)
        assert pipe(**kw(), prompt_embeds=spe, prompt_attention_mask=spm).images.shape == want.shape


# ------------------------------------------------------------------------------------------------- callbacks


def test_callback_inputs(pipe):
    """PipelineTesterMixin.test_callback_inputs: a subset and all of _callback_tensor_inputs reach the callback, and
    latents it returns replace the pipeline's (zeros at the last step give zero latents)."""
    assert pipe._callback_tensor_inputs == ["latents", "prompt_embeds"]
    seen = []

    def subset(p, i, t, kw):
        seen.append(sorted(kw))
        assert set(kw) <= set(p._callback_tensor_inputs)
        return kw

    pipe(**inputs(output_type="latent", callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"]))
    pipe(**inputs(output_type="latent", callback_on_step_end=subset,
                  callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs))
    assert seen == [["latents"]] * STEPS + [["latents", "prompt_embeds"]] * STEPS

    def zero_last(p, i, t, kw):
        if i == p.num_timesteps - 1:
            kw["latents"] = torch.zeros_like(kw["latents"])
        return kw

    out = pipe(**inputs(output_type="latent", callback_on_step_end=zero_last,
                        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)).images
    assert out.abs().sum() == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(**inputs(callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["noise"]))


def test_callback_cfg(pipe):
    """PipelineTesterMixin.test_callback_cfg: a callback that raises guidance_scale by 1 each step leaves it at the
    start value + num_timesteps."""
    def increase(p, i, t, kw):
        p._guidance_scale += 1.0
        return kw

    pipe(**inputs(guidance_scale=2.0, callback_on_step_end=increase,
                  callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs))
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


# ------------------------------------------------------------------------------------------------- save / load


def test_save_load_local(pipe, family, tmp_path):
    """PipelineTesterMixin.test_save_load_local (max diff 5e-4; here exact), through the way users load an export:
    DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR) with the template as DIR/pipeline.py."""
    from diffusers import DiffusionPipeline

    # diffusers imports every local custom pipeline as the module `diffusers_modules.local.pipeline`: drop the
    # other family's, loaded by the same test, or it finds two pipeline classes in one module
    for module in [m for m in sys.modules if m.startswith("diffusers_modules.local.pipeline")]:
        del sys.modules[module]
    pipe.save_pretrained(tmp_path)
    name = "masked_flux_pipeline.py" if family == "flux" else "masked_chroma_pipeline.py"
    shutil.copy(TEMPLATES / name, tmp_path / "pipeline.py")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path), custom_pipeline=str(tmp_path), trust_remote_code=True,
                                               torch_dtype=torch.float32)
    assert type(loaded).__name__ == type(pipe).__name__
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(pipe(**inputs()).images, loaded(**inputs()).images)
