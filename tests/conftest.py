"""Shared fixtures: tiny random-weight DeepFloyd IF models in the hub layout, and a private embedding cache."""
from __future__ import annotations

import pytest
import tiny_if


@pytest.fixture(scope="session")
def tiny_if_models(tmp_path_factory) -> tiny_if.TinyIF:
    """Stage-I and stage-II folders (TinyIF.stage_1 / .stage_2) loadable by mirage and by diffusers."""
    yield tiny_if.build(tmp_path_factory.mktemp("tiny-if"))


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
