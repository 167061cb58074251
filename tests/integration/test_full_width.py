"""FLUX.1's exact widths under torchrun: hidden 3072 (24 heads x 128), rope axes (16, 56, 56), T5 width 4096,
pooled 768, in_channels 64, with 1 double + 1 single block (0.54B parameters, written in bf16 by
`dedistill tiny-model --size full-width`). Precomputed random T5 states of varied lengths up to 512 tokens; LoKr
with the attention mask; a checkpoint after step 1 and step 2; a run resumed from step 1 ends bitwise equal to the
uninterrupted one. Catches the shape, rope and width bugs the tiny dims hide.

One rank (FSDP2 at world size 1, the same code path): what a width can break is the model, the adapter and the
checkpoint's shapes, none of which depend on the world size, and how tensors shard across ranks is what the 2-rank
tiny runs test (the reference run, the fault and resume tests). At 2 gloo ranks this test took 3.5 min of the
suite's 17, most of it the FSDP all-gathers of 2 GB of fp32 weights per step through gloo, for nothing a width adds.
Costly on CPU all the same (fp32 compute: CPUs without AVX512-BF16 emulate bf16 matmuls; about 3 GB of RAM)."""

import subprocess
import sys

import pytest

import tiny_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_width(tmp_path_factory, tiny_data_dir):
    from dataset_tools.precompute import precompute_random

    root = tmp_path_factory.mktemp("full_width")
    # a subprocess: the 0.54B parameters never sit in the test process
    subprocess.run([sys.executable, "-m", "dataset_tools", "tiny-model", str(root / "model"), "--size", "full-width",
                    "--dtype", "bf16"], check=True, cwd=tiny_runs.REPO, env=tiny_runs.env(), capture_output=True)
    precompute_random(root / "model", tiny_data_dir, root / "data", resolution=64, max_text_tokens=512)
    return root / "model", root / "data"


def _train(model, data, run_dir, steps: int):
    over = [f"model.path={model}", f"data.local={data}", f"run_dir={run_dir}", f"train.max_steps={steps}",
            "checkpoint.every_steps=1", "checkpoint.keep_last=5", "train.batch_size=1", "train.progress_bar=false",
            "sample.at_end=false", "objective.max_text_tokens=512", "objective.attention_mask=true",
            "model.adapter.kind=lokr", "ema.decay=0.5"]
    return tiny_runs.run(tiny_runs.torchrun_cmd(tiny_runs.CONFIG, *over, nproc=1), timeout=1200)


def test_full_width_lokr_step_checkpoint_and_bitwise_resume(full_width, tmp_path):
    import json

    model, data = full_width
    layout = json.loads((data / "buckets.json").read_text())
    assert layout["precompute"]["max_text_tokens"] == 512

    a = tmp_path / "a"
    r = _train(model, data, a, steps=2)
    assert "trainable=" in r.stdout and "/535,644,036" in r.stdout, r.stdout[-2000:]
    state = tiny_runs.assert_same_state(tiny_runs.ckpt(a, 2), tiny_runs.ckpt(a, 2))
    # LoKr factors at FLUX's widths: 3072 = 2 x 1536 (factor 2), the MLP's 12288 = 2 x 6144
    w1 = state["model.transformer_blocks.0.attn.to_q.lokr_w1.default"]
    w2a = state["model.transformer_blocks.0.attn.to_q.lokr_w2_a.default"]
    assert tuple(w1.shape) == (2, 2) and tuple(w2a.shape) == (1536, 4)
    assert tuple(state["model.transformer_blocks.0.ff.net.0.proj.lokr_w2_a.default"].shape) == (6144, 4)
    assert w1.abs().sum() > 0, "the LoKr step did not update w1"

    # resume from a's step-1 checkpoint in a fresh run dir; step 2 must be a's step 2, bit for bit
    b = tmp_path / "b"
    tiny_runs.started_from(a, b, 1)
    r = _train(model, data, b, steps=2)
    assert "resumed from" in r.stdout and "step_00000001" in r.stdout
    tiny_runs.assert_same_state(tiny_runs.ckpt(a, 2), tiny_runs.ckpt(b, 2))
