"""A corpus of damaged checkpoints, each run through `minillm generate`: one line on stderr, naming the file and field.

Every case starts from the same tiny random checkpoint (tests/tiny_checkpoint.py) and breaks one
thing in it, as a hostile tester or a bad download would. Each asserts the exit status (2), that
stderr is exactly one `minillm: error: ...` line, and what that line names.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minillm.checkpoint import load_model
from minillm.cli import main

from tiny_checkpoint import (
    CONFIG,
    assert_one_line_error,
    change_header,
    hf_state,
    read_safetensors,
    word_tokenizer,
    write_checkpoint,
    write_safetensors,
)

REPO = Path(__file__).resolve().parent.parent
UP_PROJ = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pristine") / "tiny")


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "tiny"))


def generate(capsys, folder: Path, *extra: str, prompt: str = "hello world") -> tuple[int, str, str]:
    code = main(["generate", "--model", str(folder), prompt, "--max-new-tokens", "4", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, folder, *fragments: str, extra=(), prompt: str = "hello world") -> str:
    """Run `minillm generate` on the folder and check it fails with one line holding every fragment."""
    code, _, err = generate(capsys, folder, *extra, prompt=prompt)
    return assert_one_line_error(code, err, *fragments)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, **changes) -> None:
    """Replace tensors of model.safetensors (keyword = Hugging Face name with dots as double underscores)."""
    state = hf_state()
    state.update({name.replace("__", "."): tensor for name, tensor in changes.items()})
    save_file(state, folder / "model.safetensors")


def first_entries(folder: Path) -> list[str]:
    """Tensor names of model.safetensors in file order."""
    header, _ = read_safetensors(folder / "model.safetensors")
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


# ----------------------------------------------------------------------------- the baseline loads

def test_the_pristine_checkpoint_generates(capsys, folder):
    code, out, err = generate(capsys, folder)
    assert code == 0 and err == "" and out.strip()


# ----------------------------------------------------------------------------- silent and wrong before

def test_nan_weight_is_named(capsys, folder):
    bad = hf_state()[UP_PROJ].clone()
    bad[3, 4] = float("nan")
    edit_weights(folder, **{UP_PROJ.replace(".", "__"): bad})
    refused(capsys, folder, f"{folder}/model.safetensors", UP_PROJ, "1 NaN or infinite")


def test_infinite_weight_is_named(capsys, folder):
    norm = torch.ones(16)
    norm[0] = float("inf")
    edit_weights(folder, model__norm__weight=norm)
    refused(capsys, folder, "model.safetensors", "model.norm.weight", "infinite")


def test_float16_overflow_is_named(capsys, folder):
    big = hf_state()[UP_PROJ].clone()
    big[0, 0] = 1e6  # finite in float32, infinite in float16
    edit_weights(folder, **{UP_PROJ.replace(".", "__"): big})
    refused(capsys, folder, UP_PROJ, "beyond the range of float16", extra=["--dtype", "float16"])


def test_negative_begin_offset(capsys, folder):
    name = first_entries(folder)[1]
    change_header(folder / "model.safetensors", lambda h: h[name]["data_offsets"].__setitem__(0, -8))
    refused(capsys, folder, "model.safetensors", name, "data_offsets [-8,")


def test_overlapping_offsets(capsys, folder):
    first, second = first_entries(folder)[:2]

    def overlap(header):
        begin, end = header[second]["data_offsets"]
        header[second]["data_offsets"] = [begin - 4, end - 4]

    change_header(folder / "model.safetensors", overlap)
    refused(capsys, folder, "model.safetensors", f"tensors {first} and {second} overlap")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_and_bool_weights_are_refused(capsys, folder, dtype):
    edit_weights(folder, model__norm__weight=torch.ones(16, dtype=dtype))
    line = refused(capsys, folder, "model.safetensors", "model.norm.weight",
                                 "weights must be floating point")
    assert str(dtype).removeprefix("torch.") in line


def test_sliding_window_zero(capsys, folder):
    edit_config(folder, architectures=["MistralForCausalLM"], sliding_window=0)
    refused(capsys, folder, f"{folder}/config.json", "'sliding_window'")


def test_index_path_outside_the_folder(capsys, folder):
    # The weights really are at ../outside/x.safetensors: without the check they would load.
    outside = folder.parent / "outside"
    outside.mkdir()
    shutil.move(folder / "model.safetensors", outside / "x.safetensors")
    weight_map = dict.fromkeys(hf_state(), "../outside/x.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused(capsys, folder, "model.safetensors.index.json", "'../outside/x.safetensors'",
                          "outside the checkpoint folder")


def test_refs_main_pointing_outside_the_cache(capsys, pristine, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(pristine, repo / "snapshots" / "abc123")
    shutil.copytree(pristine, tmp_path / "elsewhere")  # where ../../../elsewhere leads from snapshots/
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("../../../elsewhere")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    refused(capsys, "acme/tiny", "refs/main", "must hold a commit name")


def test_prompt_longer_than_the_context(capsys, folder):
    # 200 words and the BOS
    line = refused(capsys, folder, "201 tokens", "context of 64", "max_position_embeddings", prompt="hello " * 200)
    assert "shorten the prompt" in line


def test_prompt_and_new_tokens_beyond_the_context(capsys, folder):
    refused(capsys, folder, "31 tokens and max_new_tokens is 40", "ask for at most 33 new tokens",
            extra=["--max-new-tokens", "40"], prompt="hello " * 30)


# ----------------------------------------------------------------------------- raw tracebacks before

@pytest.mark.parametrize("changes, fragments", [
    ({"rope_scaling": "linear"}, ["'rope_scaling' must be an object", "'linear'"]),
    ({"num_key_value_heads": -2}, ["'num_key_value_heads' must be a positive integer", "-2"]),
    ({"num_key_value_heads": 0}, ["'num_key_value_heads' must be a positive integer", "got 0"]),
    ({"rope_theta": "ten thousand"}, ["'rope_theta' must be a finite number", "'ten thousand'"]),
    ({"rms_norm_eps": "1e-5x"}, ["'rms_norm_eps' must be a finite number", "'1e-5x'"]),
    ({"rope_theta": float("nan")}, ["'rope_theta' must be a finite number", "nan"]),
    ({"tie_word_embeddings": "false"}, ["'tie_word_embeddings' must be true or false"]),
    ({"num_hidden_layers": 10**9}, ["'num_hidden_layers' must be a positive integer (at most 1024)"]),
    ({"eos_token_id": 64}, ["'eos_token_id' must be a token id from 0 to vocab_size-1=63"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, ["rope_scaling.high_freq_factor=4"]),
])
def test_bad_config_fields(capsys, folder, changes, fragments):
    edit_config(folder, **changes)
    refused(capsys, folder, f"{folder}/config.json", *fragments)


def test_config_that_is_a_list(capsys, folder):
    (folder / "config.json").write_text(json.dumps([CONFIG]))
    refused(capsys, folder, "config.json", "must be a JSON object", "got a JSON list")


def test_safetensors_header_that_is_a_list(capsys, folder):
    change_header(folder / "model.safetensors", lambda header: [header])
    refused(capsys, folder, "model.safetensors", "header is a JSON list, not an object")


def test_negative_shape(capsys, folder):
    change_header(folder / "model.safetensors", lambda h: h["model.norm.weight"].update(shape=[-16]))
    refused(capsys, folder, "model.safetensors", "model.norm.weight", "shape [-16]")


def test_absurd_shape_is_refused_before_any_allocation(capsys, folder):
    # 2^20 x 2^20 fp32 = 4 TiB: allocating it would fail (or swap the machine to death)
    change_header(folder / "model.safetensors", lambda h: h[UP_PROJ].update(shape=[1 << 20, 1 << 20]))
    refused(capsys, folder, "model.safetensors", UP_PROJ, "needs 4398046511104 bytes")


@pytest.mark.parametrize("change, fragment", [
    (lambda h: h["model.norm.weight"].update(dtype="F33"), "unknown dtype 'F33'"),
    (lambda h: h["model.norm.weight"].update(shape=[8]), "needs 32 bytes, its data_offsets give 64"),
    (lambda h: h.update(__metadata__=["x"]), "__metadata__ is not an object"),
    (lambda h: h.__delitem__("model.norm.weight"), "belong to no tensor"),
])
def test_other_header_damage(capsys, folder, change, fragment):
    change_header(folder / "model.safetensors", change)
    refused(capsys, folder, f"{folder}/model.safetensors", fragment)


def test_header_length_beyond_the_file(capsys, folder):
    header, data = read_safetensors(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", header, data, header_length=1 << 40)
    refused(capsys, folder, "model.safetensors", "header of 1099511627776 bytes")


def test_index_weight_map_that_is_a_list(capsys, folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    refused(capsys, folder, "model.safetensors.index.json", "'weight_map'")


def test_pytorch_bin_holding_a_list(capsys, folder):
    (folder / "model.safetensors").unlink()
    torch.save(list(hf_state().values()), folder / "pytorch_model.bin")
    refused(capsys, folder, "pytorch_model.bin", "holds a list, not a dict")


def test_training_checkpoint_in_pytorch_bin(capsys, folder):
    (folder / "model.safetensors").unlink()
    torch.save({"model": hf_state(), "step": 7}, folder / "pytorch_model.bin")
    refused(capsys, folder, "pytorch_model.bin", "entry 'model' is a dict",
                          "training checkpoint")


def test_corrupt_tokenizer_json(capsys, folder):
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}')
    refused(capsys, folder, f"{folder}/tokenizer.json", "not a valid tokenizer.json")


def test_corrupt_tokenizer_model(folder):
    # Run as a process: SentencePiece is C++ and could write to stderr behind Python's back.
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x07garbage" * 40)
    done = run_minillm("generate", "--model", str(folder), "hello")
    assert_one_line_error(done.returncode, done.stderr.decode(), f"{folder}/tokenizer.model",
                          "not a valid SentencePiece tokenizer.model")


def test_tokenizer_vocabulary_larger_than_the_model(capsys, folder):
    word_tokenizer(100).save(str(folder / "tokenizer.json"))
    refused(capsys, folder, f"{folder}/tokenizer.json", "ids go up to 99",
                          "vocab_size 64")


def test_non_utf8_prompt_argument(folder):
    done = run_minillm(b"generate", b"--model", str(folder).encode(), b"caf\xe9 \xff")
    assert_one_line_error(done.returncode, done.stderr.decode(), "the prompt is not valid UTF-8 text",
                          "byte 0xe9 at character 3")


# ----------------------------------------------------------------------------- unhelpful before

def test_utf16_config(capsys, folder):
    (folder / "config.json").write_text(json.dumps(CONFIG), encoding="utf-16")
    refused(capsys, folder, f"{folder}/config.json", "UTF-16", "must be UTF-8")


def test_utf8_byte_order_mark_is_accepted(capsys, folder):
    (folder / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(CONFIG).encode())
    code, out, err = generate(capsys, folder)
    assert code == 0 and err == "" and out.strip()


def test_latin1_config(capsys, folder):
    (folder / "config.json").write_bytes(json.dumps({**CONFIG, "note": "café"}, ensure_ascii=False).encode("latin-1"))
    refused(capsys, folder, f"{folder}/config.json", "not UTF-8 (byte 0xe9")


class _MakesDirectory:
    """Unpickling this calls os.mkdir(path): the stand-in for any code a malicious pickle would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("variant", ["zip", "legacy", "plain pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(capsys, folder, variant):
    marker = folder.parent / "the-payload-ran"
    payload = {**hf_state(), "model.norm.weight": _MakesDirectory(marker)}
    (folder / "model.safetensors").unlink()
    weights = folder / "pytorch_model.bin"
    if variant == "plain pickle":
        weights.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights, _use_new_zipfile_serialization=variant == "zip")
    code, _, err = generate(capsys, folder)
    assert_one_line_error(code, err, f"{weights}: contains code", "posix.mkdir" if os.name == "posix" else "mkdir",
                          "refused")
    assert not marker.exists()


def test_legacy_pytorch_bin_loads(capsys, folder):
    (folder / "model.safetensors").unlink()
    torch.save(hf_state(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    code, out, err = generate(capsys, folder)
    assert code == 0 and err == "" and out.strip()
    expected = hf_state()
    for name, tensor in load_model(folder).state_dict().items():
        assert torch.equal(tensor, expected[("" if name == "lm_head.weight" else "model.") + name]), name


def test_truncated_pytorch_bin_gives_no_unsafe_advice(capsys, folder):
    (folder / "model.safetensors").unlink()
    weights = folder / "pytorch_model.bin"
    torch.save(hf_state(), weights, _use_new_zipfile_serialization=False)
    weights.write_bytes(weights.read_bytes()[:300])
    refused(capsys, folder, f"{weights}: truncated or corrupt PyTorch file")


def run_minillm(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MINILLM_DEBUG", None)
    return subprocess.run([sys.executable.encode(), b"-m", b"minillm.cli",
                           *[a if isinstance(a, bytes) else a.encode() for a in argv]],
                          capture_output=True, env=env, cwd=REPO, timeout=120, check=False)
