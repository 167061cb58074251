"""Shared fixtures. The tiny pipeline and dataset are written once per session (both deterministic for a seed)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny FLUX pipeline in diffusers layout (`dedistill tiny-model`, seed 0)."""
    from dataset_tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """128 procedural 64 px samples as MDS shards (`dedistill tiny-data`, seed 0)."""
    from dataset_tools.tiny_data import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tiny") / "data", n=128, size=64, seed=0)
