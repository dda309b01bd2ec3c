"""Model hyperparameters, read from a Hugging Face `config.json`.

Only what a Llama/Mistral decoder needs is kept. Anything we do not implement
(biases, other activations, yarn/dynamic RoPE, other architectures) is refused
with an error that names the field, instead of being silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json we cannot run faithfully."""


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
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json, refusing what we do not implement."""
        archs = raw.get("architectures") or []
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"unsupported architectures {archs!r}; minillm runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"{flag}=true is not supported (Llama/Mistral have no biases)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU)")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp > 1 is not supported")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                raise ConfigError(f"field {key!r} must be a positive integer, got {raw.get(key)!r}")

        num_heads = raw["num_attention_heads"]
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ConfigError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings")

        rope_theta, rope_scaling = _read_rope(raw)
        sliding_window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:  # Qwen-style switch; Mistral has none
            sliding_window = None

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=archs[0],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            sliding_window=sliding_window,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_ids,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _read_rope(raw: dict) -> tuple[float, RopeScaling]:
    """RoPE base and scaling from either the legacy fields or transformers-5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError("field 'rope_parameters' must be a dict with 'rope_theta'")
        theta = params["rope_theta"]
        scaling = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), RopeScaling()
    if "factor" not in scaling:
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", float(scaling["factor"]))
    missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in scaling]
    if missing:
        raise ConfigError(f"rope type 'llama3' needs {', '.join(missing)}")
    return float(theta), RopeScaling(
        "llama3",
        float(scaling["factor"]),
        float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]),
        int(scaling["original_max_position_embeddings"]),
    )
