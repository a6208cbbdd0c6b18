"""Shared tiny fixtures: the package's flyt-tiny config, random inputs, float64 when derivatives are checked."""

from __future__ import annotations

import pytest
import torch

from flyt.models.networks import create_clip


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards on a shared 2-core machine: a second intra-op thread only waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess_train, preprocess_val, tokenizer) for flyt-tiny, random init, fixed seed."""
    torch.manual_seed(0)
    return create_clip("flyt-tiny")


def random_tokens(tokenizer, n: int, generator: torch.Generator) -> torch.Tensor:
    words = ["cat", "dog", "red", "blue", "car", "tree", "house", "bird", "one", "two", "three"]
    idx = torch.randint(len(words), (n, 3), generator=generator)
    return tokenizer([" ".join(words[j] for j in row) for row in idx.tolist()])


@pytest.fixture(scope="session")
def train_runs(tmp_path_factory):
    """(data, out, uninterrupted(mode)) for the subprocess runs of ``train_runs``: one data set and one
    uninterrupted run per mode for every crash and pre-emption test."""
    import train_runs

    root = tmp_path_factory.mktemp("train_runs")
    data, out = train_runs.write_data(root), root / "out"
    return data, out, lambda mode, precision=None: train_runs.uninterrupted(
        data, out, mode, root / "-".join(filter(None, ("uninterrupted", mode, precision))), precision)
