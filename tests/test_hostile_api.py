"""The Python API refuses bad arguments with the project's own errors, naming the argument."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import minillm
from minillm import errors
from minillm.errors import ManipulationError, MinillmError, UsageError
from minillm.generate import Sampling, generate_tokens

from tiny_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny):
    return minillm.load(str(tiny))


@pytest.mark.parametrize("prompt, message", [
    (None, "prompt must be a string or a non-empty list of strings, got None"),
    ([], "prompt must be a string or a non-empty list of strings"),
    ([1, 2], "prompt must be a string or a non-empty list of strings"),
    ("caf\udce9", r"prompt is not valid UTF-8 text: byte 0xe9 at character 3"),
    (["ok", "\ud800"], r"prompt\[1\] is not valid UTF-8 text: U\+D800"),
])
def test_bad_prompts(loaded, prompt, message):
    with pytest.raises(UsageError, match=message):
        minillm.generate(*loaded, prompt, 2)


@pytest.mark.parametrize("max_new_tokens", [2.0, "2", -1, True, None])
def test_bad_max_new_tokens(loaded, max_new_tokens):
    with pytest.raises(UsageError, match="max_new_tokens must be >= 0"):
        minillm.generate(*loaded, "hello", max_new_tokens)


@pytest.mark.parametrize("prompts, message", [
    ([[1, 64]], r"prompts\[0\]: token id 64 is not in the model's vocabulary \(0\.\.63\)"),
    ([[1, 5], [-1]], r"prompts\[1\]: token id -1 is not"),
    ([[1, 2.5]], r"token id 2\.5 is not"),
    ([[True]], r"token id True is not"),
    ([[]], r"prompts\[0\] is empty"),
    ([], "prompts must be a non-empty list of token-id lists"),
    (None, "prompts must be a non-empty list"),
    ("hello", "prompts must be a non-empty list"),
    ([torch.tensor([1.0, 2.0])], r"prompts\[0\] must be a 1-D integer tensor"),
    ([list(range(1, 61))], r"prompts\[0\] has 60 tokens and max_new_tokens is 5: 65 positions"),
])
def test_bad_token_prompts(loaded, prompts, message):
    model, _ = loaded
    with pytest.raises(UsageError, match=message):
        generate_tokens(model, prompts, 5)


def test_token_prompts_as_tensors_and_tuples_work(loaded):
    model, _ = loaded
    as_lists = generate_tokens(model, [[1, 5, 6], [1, 7]], 3).tokens
    assert generate_tokens(model, [torch.tensor([1, 5, 6]), (1, 7)], 3).tokens == as_lists


def test_float_max_new_tokens_in_generate_tokens(loaded):
    with pytest.raises(UsageError, match="max_new_tokens must be >= 0"):
        generate_tokens(loaded[0], [[1, 5]], 2.0)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", math.nan, "sampling.temperature must be a finite number"),
    ("temperature", math.inf, "sampling.temperature must be a finite number"),
    ("top_p", math.nan, r"sampling.top_p must be a number in \(0, 1\]"),
])
def test_nan_sampling_settings(loaded, field, value, message):
    sampling = Sampling()
    setattr(sampling, field, value)  # changed after Sampling checked it: generation checks again
    with pytest.raises(UsageError, match=message):
        generate_tokens(loaded[0], [[1, 5]], 2, sampling=sampling)


def test_pad_id_outside_the_vocabulary(loaded):
    with pytest.raises(UsageError, match="pad_id: token id 99 is not in the model's vocabulary"):
        generate_tokens(loaded[0], [[1, 5], [1]], 2, pad_id=99)


def test_swap_vectors_given_as_a_list():
    with pytest.raises(ManipulationError, match="swap vectors must be a torch.Tensor, got a list"):
        minillm.Manipulation("swap", 1, positions=(0,), vectors=[[0.0] * 16])


def test_non_finite_swap_vectors(loaded):
    vectors = torch.zeros(1, 16)
    vectors[0, 3] = math.nan
    swap = minillm.Manipulation("swap", 1, positions=(0,), vectors=vectors)
    with pytest.raises(UsageError, match="manipulation vectors must be finite"):
        generate_tokens(loaded[0], [[1, 5]], 2, manipulation=swap)


@pytest.mark.parametrize("options, message", [
    ({"device": "bogus"}, "device 'bogus' is not a device"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"dtype": torch.int32}, "dtype must be one of"),
    ({"dtype": ["float32"]}, "dtype must be one of"),
])
def test_bad_load_arguments_are_refused_before_reading(tmp_path, options, message):
    # The folder does not exist: the arguments are checked first.
    with pytest.raises(UsageError, match=message):
        minillm.load(str(tmp_path / "nothing"), **options)


def test_every_error_is_the_projects_own():
    kinds = [errors.ConfigError, errors.CheckpointError, errors.TokenizerError, errors.ManipulationError,
             errors.AssetError, errors.UsageError]
    for kind in kinds:
        assert issubclass(kind, MinillmError) and issubclass(kind, ValueError)
    # The classes are also reachable where they used to be defined.
    from minillm.assets import AssetError
    from minillm.checkpoint import CheckpointError
    from minillm.config import ConfigError
    from minillm.manipulation import ManipulationError as FromManipulation
    from minillm.tokenizer import TokenizerError
    assert (ConfigError, CheckpointError, TokenizerError, FromManipulation, AssetError) == tuple(kinds[:5])


@pytest.mark.parametrize("options, message", [
    ({"temperature": math.nan}, "sampling.temperature must be a finite number"),
    ({"temperature": -1.0}, "sampling.temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"sampling.top_p must be a number in \(0, 1\]"),
    ({"top_k": -2}, "sampling.top_k must be >= 0"),
])
def test_sampling_refuses_bad_settings_when_made(options, message):
    with pytest.raises(UsageError, match=message):
        Sampling(**options)
