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
    assert set(steps) == {"load_memory", "model", "ops", "sweep", "reproduce"}
    for name, words in steps.items():
        options = {word.split("=")[0] for word in words if word.startswith("--")}
        program = words[:3] if words[0] == "-m" else words[:1]  # -m MODULE COMMAND, or a script
        result = subprocess.run([sys.executable, *program, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{name}: {result.stderr[-500:]}"
        unknown = {option for option in options if option not in result.stdout}
        assert not unknown, f"step {name}: {' '.join(program)} has no option {sorted(unknown)}"
