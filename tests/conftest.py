"""Shared fixtures: tiny random-weight DeepFloyd IF models in the hub layout, and a private embedding cache."""
from __future__ import annotations

import pytest
import tiny_if
import torch

from mirage.backends.deepfloyd import load_stage


@pytest.fixture(scope="session")
def tiny_if_models(tmp_path_factory) -> tiny_if.TinyIF:
    """Stage-I and stage-II folders (TinyIF.stage_1 / .stage_2) loadable by mirage and by diffusers."""
    yield tiny_if.build(tmp_path_factory.mktemp("tiny-if"))


@pytest.fixture(scope="module")
def stages(tiny_if_models):
    """The tiny IF's stages I and II in fp32 on the CPU, loaded by mirage, once per test module."""
    one = load_stage(str(tiny_if_models.stage_1), device="cpu", dtype=torch.float32)
    two = load_stage(str(tiny_if_models.stage_2), device="cpu", dtype=torch.float32,
                     text_encoder_from=str(tiny_if_models.stage_1))
    return one, two


@pytest.fixture(autouse=True)
def _private_embedding_cache(tmp_path_factory, monkeypatch):
    # No test reads or writes the user's ~/.cache/mirage.
    monkeypatch.setenv("MIRAGE_CACHE", str(tmp_path_factory.mktemp("mirage-cache")))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny models on 2 cores: a second thread mostly waits on the first (measured by helpers).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
