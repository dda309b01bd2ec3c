#!/usr/bin/env bash
# Create .venv with minillm and its test tools. torch is pinned here (the CPU build of 2.13.0), and so is
# ruff (a newer ruff may add findings to the rule sets CI checks); pyproject.toml itself accepts any
# torch >= 2.5 and ruff >= 0.6.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "ruff==0.17.6"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
