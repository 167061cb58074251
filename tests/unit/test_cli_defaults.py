"""The CLI's defaults are the library's defaults, so a test that calls a function with its defaults runs what a user
who types no optional flag gets (a path that only the CLI's defaults reach, such as `--workers 1` with the
progress bar, is then tested too). Where a
default could only differ on purpose, the pair is listed here and a change to either side fails."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from launch.cli import _load_extensions, build_parser

    _load_extensions()
    out = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return out


def _cli_defaults(command: str) -> dict:
    parser = _subparsers()[command]
    return {a.dest: a.default for a in parser._actions if a.option_strings and a.dest != "help"}


def _fn_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _dc_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# (command, CLI option dest, where the library keeps its default, that default's name there)
def _pairs():
    from dataset_tools.buckets import BucketSpec, bucket_dataset
    from dataset_tools.convert import ConvertOptions, convert
    from dataset_tools.inspect_mds import inspect_dataset
    from dataset_tools.precompute import PrecomputeOptions, precompute
    from evals.sampler import SamplingSettings
    from launch.export import export_checkpoint

    convert_fn, conv_opts = _fn_defaults(convert), _dc_defaults(ConvertOptions)
    pairs = [("data convert", "workers", convert_fn["workers"]), ("data convert", "shard_index", convert_fn["shard_index"]),
             ("data convert", "num_shards", convert_fn["num_shards"])]
    pairs += [("data convert", k, conv_opts[k]) for k in ("kind", "min_size", "check", "caption_field", "path_field",
                                                          "key_field", "max_pixels", "max_side")]
    for cmd, fn in (("data bucket", bucket_dataset), ("data precompute", precompute)):
        d = _fn_defaults(fn)
        pairs += [(cmd, "shard_index", d["shard_index"]), (cmd, "num_shards", d["num_shards"])]
        pairs += [(cmd, "max_aspect", _dc_defaults(BucketSpec)["max_aspect"]),
                  (cmd, "square", _dc_defaults(BucketSpec)["square"])]
    pairs += [("data precompute", "resolution", _dc_defaults(BucketSpec)["resolution"])]
    pre = _dc_defaults(PrecomputeOptions)
    pairs += [("data precompute", k, pre[k]) for k in ("latents", "dtype", "max_text_tokens", "batch_size", "device",
                                                       "model_dtype", "caption_key", "image_key", "keep_image")]
    samp = _dc_defaults(SamplingSettings)
    pairs += [("sample", cli, samp[lib]) for cli, lib in (
        ("cfg", "cfg_scale"), ("steps", "steps"), ("max_text_tokens", "max_text_tokens"), ("resolution", "resolution"),
        ("seed", "seed"), ("noise_temperature", "noise_temperature"), ("cfg_skip_steps", "cfg_skip_steps"),
        ("cfg_rescale", "cfg_rescale"), ("negative_prompt", "negative_prompt"))]
    exp = _fn_defaults(export_checkpoint)
    pairs += [("export", "fmt", exp["fmt"]), ("export", "dtype", exp["dtype"]), ("export", "ema", exp["ema"]),
              ("export", "lora_layout", exp["lora_layout"])]
    from train.inference import load_for_inference

    inf = _fn_defaults(load_for_inference)  # None: the run's sample.schedule, or the model dir's scheduler config
    pairs += [("sample", "schedule", inf["schedule"]), ("sample", "shift", inf["shift"])]
    insp = _fn_defaults(inspect_dataset)
    pairs += [("data inspect", "max_samples", insp["max_samples"]), ("data inspect", "plot", insp["plot"])]
    return pairs


def test_every_cli_default_is_the_library_default():
    mismatched = []
    for command, dest, lib_default in _pairs():
        cli = _cli_defaults(command)
        assert dest in cli, f"`dedistill {command}` has no option for {dest}"
        if cli[dest] != lib_default:
            mismatched.append(f"dedistill {command} --{dest.replace('_', '-')}: CLI {cli[dest]!r}, library {lib_default!r}")
    assert not mismatched, mismatched


@pytest.mark.parametrize("command", ["data convert", "data bucket", "data precompute"])
def test_progress_bars_are_on_by_default_in_the_cli_and_the_library(command):
    """--no-progress is opt-in, and the library's progress_bar defaults to True: the bar path is the default path."""
    from dataset_tools.buckets import bucket_dataset
    from dataset_tools.convert import convert
    from dataset_tools.precompute import precompute

    fn = {"data convert": convert, "data bucket": bucket_dataset, "data precompute": precompute}[command]
    assert _cli_defaults(command)["no_progress"] is False and _fn_defaults(fn)["progress_bar"] is True


def test_each_subcommand_is_registered_by_the_module_the_table_names():
    """launch/cli.py's `_EXTENSION_MODULES` (what main() imports for one command) names, for every command, the module
    that registers it; a built-in command loads no extension, and no command or an unknown one loads them all."""
    from launch import cli

    def registered(command):
        cli._load_extensions(command)
        sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices) - set(cli._BUILTIN)

    everything = registered(None)
    assert everything == set(cli._EXTENSION_MODULES) and registered("no-such-command") == everything
    for command, module in cli._EXTENSION_MODULES.items():
        assert command in registered(command), (command, module)
        assert registered(command) == {c for c, m in cli._EXTENSION_MODULES.items() if m == module}
    assert registered("train") == set()
    cli._load_extensions(None)
    top = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(top.choices) == set(cli._BUILTIN) | everything  # no command outside the two tables
