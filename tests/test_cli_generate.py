"""`minillm generate` on the embedded SmolLM2-135M, swap included (a donor prompt and two positions)."""

from __future__ import annotations

import re

import pytest
import torch

import minillm
from minillm.cli import main
from minillm.manipulation import Manipulation

PROMPT = "Q: What is the capital of Spain?\nA: Madrid\nQ: What is the capital of France?\nA:"
DONOR = "The country Italy"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return minillm.load(str(smollm2_dir))


def generate_from_cli(capsys, *arguments) -> str:
    assert main(["generate", *arguments]) == 0
    return capsys.readouterr().out


def test_swap_from_the_command_line_is_the_python_swap(smollm2_dir, smollm2, capsys):
    model, tokenizer = smollm2
    france = tokenizer.encode(PROMPT).index(tokenizer.encode(" France")[0])
    common = ["--model", str(smollm2_dir), "--max-new-tokens", "2", "--manipulation", "swap",
              "--donor-prompt", DONOR, "--position", str(france), PROMPT]
    # Low, the donor's " Italy" is followed; in the top layers it is ignored (docs/manipulations.md).
    assert generate_from_cli(capsys, "--layer", "0", *common).startswith(" Rome")
    assert generate_from_cli(capsys, "--layer", "29", *common).startswith(" Paris")
    # the same as the Python API with the donor's H[k] at its last token, the default --donor-position
    with torch.no_grad():
        donor = model.residual_stream(torch.tensor([tokenizer.encode(DONOR)]))
    swap = Manipulation("swap", 5, positions=(france,), vectors=donor[5][0, -1:])
    expected = minillm.generate(model, tokenizer, PROMPT, 2, manipulation=swap)
    assert generate_from_cli(capsys, "--layer", "5", "--donor-position", "-1", *common) == expected + "\n"


@pytest.mark.parametrize("arguments, message", [
    (["--manipulation", "swap", "--layer", "3"], "needs --donor-prompt TEXT and --position J"),
    (["--manipulation", "freeze", "--layer", "3", "--position", "2"], "only apply with --manipulation swap"),
    (["--manipulation", "swap", "--layer", "3", "--donor-prompt", "Rome", "--donor-position", "9", "--position", "2"],
     "--donor-position 9 is outside"),
    (["--manipulation", "swap", "--layer", "31", "--donor-prompt", "Rome", "--position", "2"],
     "--layer 31: swap layer k=31 is outside 0..30"),
    (["--manipulation", "swap", "--layer", "3", "--donor-prompt", "Rome", "--position", "99"],
     r"swap positions \[99\] are outside"),
])
def test_bad_swap_arguments_exit_with_one_line(smollm2_dir, capsys, arguments, message):
    assert main(["generate", "--model", str(smollm2_dir), "--max-new-tokens", "1", *arguments, PROMPT]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("minillm: error:")
    assert re.search(message, error), error


@pytest.mark.parametrize("arguments, message", [
    (["--manipulation", "random", "--layer", "31"], "--layer 31: random layer k=31 is outside 0..30 for a 30-layer"),
    (["--manipulation", "freeze", "--layer", "0"], r"--layer 0: freeze layer k=0 is outside 1..30 .*k >= 1"),
    (["--manipulation", "swap", "--layer", "-1", "--donor-prompt", "Rome", "--position", "2"], "--layer -1: swap"),
    (["--manipulation", "skip_attention", "--layer", "28", "--window", "3"], "window of 3 layers from k=28 goes past"),
])
def test_a_layer_outside_the_model_is_refused_before_the_weights_load(smollm2_dir, capsys, monkeypatch, arguments,
                                                                     message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(minillm.checkpoint, "load_model", no_loading)
    monkeypatch.setattr(minillm.api, "load_model", no_loading)
    assert main(["generate", "--model", str(smollm2_dir), *arguments, PROMPT]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error


def test_spare_first_and_window_from_the_command_line_are_the_python_variants(smollm2_dir, smollm2, capsys):
    model, tokenizer = smollm2
    for flags, manipulation in [
        (["--manipulation", "random", "--layer", "20", "--seed", "3", "--spare-first", "1"],
         Manipulation("random", 20, seed=3, spare_first=1)),
        (["--manipulation", "skip_attention", "--layer", "12", "--window", "3"],
         Manipulation("skip_attention", 12, window=3)),
    ]:
        expected = minillm.generate(model, tokenizer, PROMPT, 3, manipulation=manipulation)
        assert expected != minillm.generate(model, tokenizer, PROMPT, 3, manipulation=Manipulation(
            manipulation.kind, manipulation.layer, seed=manipulation.seed)), "the flag changes nothing here"
        output = generate_from_cli(capsys, "--model", str(smollm2_dir), "--max-new-tokens", "3", *flags, PROMPT)
        assert output == expected + "\n"


@pytest.mark.parametrize("arguments, message", [
    (["--spare-first", "1"], "only apply with --manipulation random, freeze or skip_attention"),
    (["--manipulation", "swap", "--layer", "3", "--donor-prompt", "Rome", "--position", "2", "--window", "2"],
     "only apply with --manipulation random, freeze or skip_attention"),
    (["--manipulation", "random", "--layer", "3", "--window", "2"], "window does not apply to random"),
    (["--manipulation", "freeze", "--layer", "3", "--spare-first", "-1"], "spare_first must be an integer >= 0"),
    (["--manipulation", "skip_attention", "--layer", "29", "--window", "2"], "goes past the top layer 29"),
    (["--manipulation", "freeze", "--layer", "3", "--window", "2"], "use mode='faithful'"),
    (["--compile", "--mode", "faithful"], "--compile .* needs --mode cached"),
])
def test_bad_variant_arguments_exit_with_one_line(smollm2_dir, capsys, arguments, message):
    assert main(["generate", "--model", str(smollm2_dir), "--max-new-tokens", "1", *arguments, PROMPT]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("minillm: error:")
    assert re.search(message, error), error


def test_compile_without_a_compiler_exits_with_one_line(smollm2_dir, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert main(["generate", "--model", str(smollm2_dir), "--max-new-tokens", "1", "--compile", PROMPT]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--compile on the CPU needs a C++ compiler" in error, error
    assert "no-such-compiler-here" in error
