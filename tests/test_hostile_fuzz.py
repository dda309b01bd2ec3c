"""Property-based fuzzing of loading: random damage to safetensors headers, tensor bytes and config.json values.

Whatever the damage, loading either succeeds with finite weights of the shapes the config implies,
or raises minillm's own error (`MinillmError`, which names the file). Anything else (an IndexError,
a torch RuntimeError, an attempt to allocate terabytes, a hang) is a bug that hypothesis shrinks
to a minimal example. Each test is bounded (150 examples) to fit CI: a few seconds each.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import minillm
from minillm.checkpoint import load_model
from minillm.errors import MinillmError

from tiny_checkpoint import CONFIG, read_safetensors, write_checkpoint

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

with tempfile.TemporaryDirectory() as scratch:
    PRISTINE = write_checkpoint(Path(scratch) / "tiny")
    FILES = {path.name: path.read_bytes() for path in PRISTINE.iterdir()}
    HEADER, DATA = read_safetensors(PRISTINE / "model.safetensors")
TENSORS = sorted(name for name in HEADER if name != "__metadata__")

# Any JSON value, and integers near the boundaries that matter (0, small sizes, offsets, 2^31, 2^63, 2^64).
NUMBERS = (st.integers(-3, 3) | st.integers(0, 5000) | st.sampled_from([2**31, 2**32, 2**63 - 1, 2**64, -2**63])
           | st.floats(allow_nan=True, allow_infinity=True))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)
DTYPES = st.sampled_from(["F64", "F32", "F16", "BF16", "F8_E4M3", "I32", "I8", "U8", "BOOL", "f32", ""])
# The bit patterns of NaN and infinity in float32, and anything else.
POISON = st.sampled_from([struct.pack("<f", float("nan")), struct.pack("<f", float("inf")),
                          struct.pack("<f", float("-inf"))]) | st.binary(min_size=1, max_size=8)

HEADER_DAMAGE = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(TENSORS), st.sampled_from(["dtype", "shape", "data_offsets"]), JSON),
    st.tuples(st.just("set"), st.sampled_from(TENSORS), st.just("dtype"), DTYPES),
    st.tuples(st.just("set"), st.sampled_from(TENSORS), st.sampled_from(["shape", "data_offsets"]),
              st.lists(NUMBERS, max_size=3)),
    st.tuples(st.just("shift"), st.sampled_from(TENSORS), st.integers(0, 1), st.integers(-64, 64)),
    st.tuples(st.just("drop"), st.sampled_from(TENSORS)),
    st.tuples(st.just("add"), st.text(max_size=10), JSON),
    st.tuples(st.just("replace header"), JSON),
    st.tuples(st.just("header length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, len(DATA))),
    st.tuples(st.just("poison"), st.integers(0, len(DATA) - 1), POISON),
)

CONFIG_KEYS = sorted(CONFIG) + ["head_dim", "sliding_window", "rope_scaling", "rope_parameters", "use_sliding_window",
                                "attention_bias", "hidden_act", "pad_token_id", "pretraining_tp"]
PLAUSIBLE = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 63, 64, 65, -1, 1e-5, 10000.0, "silu", "linear", True, False,
                             {"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0},
                             ["LlamaForCausalLM"], ["MistralForCausalLM"]])
CONFIG_DAMAGE = st.tuples(st.sampled_from(CONFIG_KEYS), st.none() | st.just("<delete>") | PLAUSIBLE | JSON)


def damaged_safetensors(damages) -> bytes:
    header, data = json.loads(json.dumps(HEADER)), bytearray(DATA)
    header_length = None
    for kind, *what in damages:
        entry = header.get(what[0]) if isinstance(header, dict) and isinstance(what[0], str) else None
        if kind == "set" and isinstance(entry, dict):
            entry[what[1]] = what[2]
        elif kind == "shift" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            offsets = entry["data_offsets"]
            if len(offsets) > what[1] and isinstance(offsets[what[1]], int):
                offsets[what[1]] += what[2]
        elif kind == "drop" and isinstance(header, dict):
            header.pop(what[0], None)
        elif kind == "add" and isinstance(header, dict):
            header[what[0]] = what[1]
        elif kind == "replace header":
            header = what[0]
        elif kind == "header length":
            header_length = what[0]
        elif kind == "truncate":
            del data[what[0]:]
        elif kind == "poison":
            data[what[0]:what[0] + len(what[1])] = what[1]
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return length.to_bytes(8, "little") + text + bytes(data)


def folder_with(scratch: str, **files: bytes) -> Path:
    folder = Path(scratch) / "tiny"
    folder.mkdir()
    for name, content in {**FILES, **files}.items():
        (folder / name).write_bytes(content)
    return folder


def assert_loaded_model_is_sound(model) -> None:
    with torch.device("meta"):
        expected = type(model)(model.config).state_dict()
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert tensor.shape == expected[name].shape, name
        assert tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name


@FUZZ
@given(st.lists(HEADER_DAMAGE, min_size=1, max_size=3))
def test_damaged_safetensors_loads_soundly_or_raises_our_error(damages):
    with tempfile.TemporaryDirectory() as scratch:
        folder = folder_with(scratch, **{"model.safetensors": damaged_safetensors(damages)})
        try:
            model = load_model(folder)
        except MinillmError as error:
            event(f"refused: {type(error).__name__}")
            assert "model.safetensors" in str(error) or str(folder) in str(error)
            return
        event("loaded")
        assert_loaded_model_is_sound(model)


@FUZZ
@given(st.lists(CONFIG_DAMAGE, min_size=1, max_size=3))
def test_damaged_config_loads_soundly_or_raises_our_error(damages):
    config = dict(CONFIG)
    for key, value in damages:
        if value == "<delete>":
            config.pop(key, None)
        else:
            config[key] = value
    with tempfile.TemporaryDirectory() as scratch:
        folder = folder_with(scratch, **{"config.json": json.dumps(config).encode()})
        try:
            model, tokenizer = minillm.load(str(folder))
        except MinillmError as error:
            event(f"refused: {type(error).__name__}")
            assert str(folder) in str(error)
            return
        event("loaded")
        assert_loaded_model_is_sound(model)
        assert tokenizer.vocab_size <= model.config.vocab_size
