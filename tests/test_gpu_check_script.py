"""benchmarks/gpu_check.sh is run once, by whoever is lent a GPU: each of its steps must name a script or
command that exists, with options that it accepts (it named `minillm.cli reproduce` after the command moved
to the harness, and that step failed)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def gpu_check_steps() -> dict[str, list[str]]:
    """Each step's command line after "$PY", its continuation lines joined, shell variables left as they are."""
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    return {name: shlex.split(command) for name, command in re.findall(r'^step (\w+) "\$PY" (.+)$', text, re.M)}


def test_every_gpu_check_step_runs_a_command_that_accepts_its_options():
    steps = gpu_check_steps()
    assert set(steps) == {"load_memory", "model", "ops", "sweep", "reproduce", "compiled", "packed"}
    for name, words in steps.items():
        options = {word.split("=")[0] for word in words if word.startswith("--")}
        program = words[:3] if words[0] == "-m" else words[:1]  # -m MODULE COMMAND, or a script
        result = subprocess.run([sys.executable, *program, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{name}: {result.stderr[-500:]}"
        unknown = {option for option in options if option not in result.stdout}
        assert not unknown, f"step {name}: {' '.join(program)} has no option {sorted(unknown)}"



def test_offline_bundle_gives_smollm2_random_weights_in_its_shape_that_load(tmp_path, monkeypatch):
    """On a GPU machine without network, gpu_check.sh unpacks the bundle into a fresh cache: SmolLM2's folder
    (config and tokenizer only) must get weights that minillm loads, marked as random, with the embedding tied."""
    import json
    import shutil

    import minillm
    from minillm.embedded import SMOLLM2_NAME, ensure_smollm2
    from minillm.tokenizer import load_tokenizer

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from offline_bundle import MODEL_FILES, RANDOM_MARKER, unpack

    real = ensure_smollm2()
    bundle_model = tmp_path / "bundle" / "cache" / "models" / SMOLLM2_NAME
    bundle_model.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy2(real / name, bundle_model / name)
    config = json.loads((bundle_model / "config.json").read_text())

    cache = tmp_path / "cache"
    unpack(tmp_path / "bundle", cache)
    folder = cache / "models" / SMOLLM2_NAME
    assert (folder / RANDOM_MARKER).is_file()
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    model, tokenizer = minillm.load(SMOLLM2_NAME, dtype="bfloat16")  # by name, as the sweep and reproduce load it
    assert (model.config.num_layers, model.config.hidden_size, model.config.vocab_size) == (
        config["num_hidden_layers"], config["hidden_size"], config["vocab_size"])
    assert model.lm_head.weight is model.embed_tokens.weight  # tied, as SmolLM2's are
    assert abs(model.layers[1].mlp.down_proj.weight.float().std().item() - 0.02) < 0.002  # the random ones, not zeros
    text = "The capital of France is"
    assert tokenizer.encode(text) == load_tokenizer(real).encode(text)

    weights = sorted(folder.glob("*.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in weights]
    unpack(tmp_path / "bundle", cache)  # a second unpack keeps the weights it finds
    assert [path.stat().st_mtime_ns for path in sorted(folder.glob("*.safetensors"))] == stamps
