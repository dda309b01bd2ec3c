"""Model hyperparameters, read from a Hugging Face `config.json`.

Only what a Llama/Mistral decoder needs is kept. Anything we do not implement
(biases, other activations, yarn/dynamic RoPE, other architectures) is refused
with an error that names the field, instead of being silently ignored.

Every field is checked before use: its type (a number is a JSON number, not the
string "1e-5"; a flag is true/false, not the string "false", which Python would
read as true), its range (no zero or negative sizes, no NaN, no sliding window
of 0) and an upper bound far above any released model, so that a corrupt file
cannot make even the shape-only model take minutes to build.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minillm.errors import ConfigError, MinillmError

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "read_json_file"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Upper bounds of the integer fields, each far above any released Llama/Mistral-style model
# (vocabularies reach ~260k, hidden sizes ~16k, depths ~130 layers).
LARGEST = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 31, "sliding_window": 1 << 31, "original_max_position_embeddings": 1 << 31,
}
JSON_LIMIT = 100_000_000  # bytes; the largest real ones (tokenizer_config.json with many added tokens) are a few MB


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled for long context (`rope_type` "linear" or "llama3")."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral: a query sees its W most recent keys, itself included
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head (1 = plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        raw = read_json_file(path, ConfigError)
        try:
            return cls.from_hf(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf(cls, raw: dict) -> ModelConfig:
        """Build from the dict of a Hugging Face config.json, refusing what we do not implement."""
        if not isinstance(raw, dict):
            raise ConfigError(f"must be a JSON object {{...}}, got a JSON {_json_type(raw)}")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"unsupported architectures {_shown(archs)}; minillm runs "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for flag in ("attention_bias", "mlp_bias"):
            if _flag(raw, flag, False):
                raise ConfigError(f"{flag}=true is not supported (Llama/Mistral have no biases)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={_shown(act)} is not supported (only 'silu', i.e. SwiGLU)")
        if raw.get("pretraining_tp", 1) not in (1, None) or isinstance(raw.get("pretraining_tp"), bool):
            raise ConfigError(f"pretraining_tp={_shown(raw['pretraining_tp'])} is not supported (only 1)")

        vocab_size = _size(raw, "vocab_size")
        hidden_size = _size(raw, "hidden_size")
        num_heads = _size(raw, "num_attention_heads")
        num_kv_heads = _size(raw, "num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = _size(raw, "head_dim", default=None) or hidden_size // num_heads
        if head_dim == 0:
            raise ConfigError(f"num_attention_heads={num_heads} is more than hidden_size={hidden_size} and there is "
                              f"no head_dim field: the heads would have no dimensions")
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings")

        rope_theta, rope_scaling = _read_rope(raw)
        sliding_window = _size(raw, "sliding_window", default=None)
        if not _flag(raw, "use_sliding_window", True):  # Qwen-style switch; Mistral has none
            sliding_window = None

        return cls(
            architecture=archs[0],
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=_size(raw, "intermediate_size"),
            num_layers=_size(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_number(raw, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_size(raw, "max_position_embeddings", default=4096),
            sliding_window=sliding_window,
            tie_word_embeddings=_flag(raw, "tie_word_embeddings", False),
            bos_token_id=_token_id(raw, "bos_token_id", vocab_size),
            eos_token_id=_token_ids(raw, "eos_token_id", vocab_size),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def read_json_file(path: Path, error: type[MinillmError]):
    """The JSON value in `path`, or `error` naming the file: not UTF-8 (UTF-16 included), or not JSON.

    A UTF-8 byte-order mark is skipped (Windows editors write one). UTF-16 and UTF-32
    are refused: Hugging Face tools read these files as UTF-8 only, so such a file is
    broken for them too, and saying so is more useful than reading it.
    """
    size = path.stat().st_size
    if size > JSON_LIMIT:  # read into memory whole: refuse before reading
        raise error(f"{path}: {size} bytes, too large for a JSON settings file (the limit is {JSON_LIMIT})")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4]:
        raise error(f"{path}: encoded as UTF-16 or UTF-32; it must be UTF-8 (save it again as UTF-8)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    f"it must be UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # a number of thousands of digits, or nesting thousands deep
        raise error(f"{path}: not valid JSON ({str(e).splitlines()[0][:100]})") from None


# --- one field at a time -----------------------------------------------------------------------

def _shown(value) -> str:
    """repr of a value from the file, cut short: a hostile field can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the number 1


def _size(raw: dict, key: str, default=..., name: str | None = None) -> int | None:
    """A positive integer field, at most LARGEST[key]; absent or null gives `default` (... = required)."""
    value = raw.get(key)
    if value is None and default is not ...:
        return default
    if not _is_integer(value) or not 1 <= value <= LARGEST[key]:
        raise ConfigError(f"field {name or key!r} must be a positive integer (at most {LARGEST[key]}), "
                          f"got {_shown(value)}")
    return value


def _positive_number(raw: dict, key: str, default: float, name: str | None = None, above: float = 0.0) -> float:
    """A finite number field greater than `above` (the JSON number itself, not a string of one)."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= above:
        raise ConfigError(f"field {name or key!r} must be a finite number greater than {above:g}, got {_shown(value)}")
    return float(value)


def _flag(raw: dict, key: str, default: bool) -> bool:
    """A true/false field (a string "false" would be true to Python: refused)."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"field {key!r} must be true or false, got {_shown(value)}")
    return value


def _token_id(raw: dict, key: str, vocab_size: int) -> int | None:
    value = raw.get(key)
    if value is not None and (not _is_integer(value) or not 0 <= value < vocab_size):
        raise ConfigError(f"field {key!r} must be a token id from 0 to vocab_size-1={vocab_size - 1}, "
                          f"got {_shown(value)}")
    return value


def _token_ids(raw: dict, key: str, vocab_size: int) -> tuple[int, ...]:
    """A token id or a list of them (eos_token_id is either)."""
    value = raw.get(key)
    values = value if isinstance(value, list) else [value]
    return tuple(_token_id({key: v}, key, vocab_size) for v in values if v is not None)


def _read_rope(raw: dict) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from either the legacy fields or transformers-5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError("field 'rope_parameters' must be an object with 'rope_theta'")
        where, theta_source, scaling = "rope_parameters", params, params
    else:
        scaling = raw.get("rope_scaling")
        if scaling is None:
            scaling = {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"field 'rope_scaling' must be an object or null, got a JSON {_json_type(scaling)} "
                              f"{_shown(scaling)}")
        where, theta_source = "rope_scaling", raw
    # theta <= 1 gives frequencies >= 1 that grow with the dimension (NaN for tiny values): never meant
    theta = _positive_number(theta_source, "rope_theta", 10000.0, above=1.0,
                             name="rope_theta" if theta_source is raw else "rope_parameters.rope_theta")
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {_shown(rope_type)} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, RopeScaling()
    if "factor" not in scaling:
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    factor = _positive_number(scaling, "factor", 1.0, name=f"{where}.factor")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in scaling]
    if missing:
        raise ConfigError(f"rope type 'llama3' needs {', '.join(missing)}")
    low = _positive_number(scaling, "low_freq_factor", 1.0, name=f"{where}.low_freq_factor")
    high = _positive_number(scaling, "high_freq_factor", 4.0, name=f"{where}.high_freq_factor")
    if high <= low:  # the smoothing between the two divides by their difference
        raise ConfigError(f"{where}.high_freq_factor={high:g} must be greater than low_freq_factor={low:g}")
    original = _size(scaling, "original_max_position_embeddings", name=f"{where}.original_max_position_embeddings")
    return theta, RopeScaling("llama3", factor, low, high, original)
