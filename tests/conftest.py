"""Shared tiny fixtures: the package's flyt-tiny config, random inputs, float64 when derivatives are checked."""

from __future__ import annotations

import pytest
import torch

from flyt.models import create_clip


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess_train, preprocess_val, tokenizer) for flyt-tiny, random init, fixed seed."""
    torch.manual_seed(0)
    return create_clip("flyt-tiny")


def random_tokens(tokenizer, n: int, generator: torch.Generator) -> torch.Tensor:
    words = ["cat", "dog", "red", "blue", "car", "tree", "house", "bird", "one", "two", "three"]
    idx = torch.randint(len(words), (n, 3), generator=generator)
    return tokenizer([" ".join(words[j] for j in row) for row in idx.tolist()])
