import json

import pytest

from minillm.config import ConfigError, ModelConfig

BASE = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-5,
}


def test_llama2_style_defaults():
    config = ModelConfig.from_hf(BASE)
    assert (config.num_kv_heads, config.head_dim, config.kv_groups) == (32, 128, 1)
    assert config.rope_theta == 10000.0 and config.rope_scaling.rope_type == "default"
    assert config.sliding_window is None and not config.tie_word_embeddings


def test_legacy_and_transformers5_rope_fields_read_the_same():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    legacy = ModelConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    legacy_type_key = ModelConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    new = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", **scaling}})
    assert legacy == legacy_type_key == new
    assert new.rope_theta == 5e5 and new.rope_scaling.factor == 8.0


def test_mistral_and_gqa_fields():
    config = ModelConfig.from_hf({**BASE, "architectures": ["MistralForCausalLM"], "num_key_value_heads": 8,
                                  "sliding_window": 4096, "head_dim": 128, "eos_token_id": [2, 7]})
    assert (config.num_kv_heads, config.kv_groups, config.sliding_window) == (8, 4, 4096)
    assert config.eos_token_id == (2, 7)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architectures"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"hidden_size": "big"}, "'hidden_size' must be a positive integer"),
    ({"hidden_size": True}, "'hidden_size' must be a positive integer"),  # JSON true is not 1
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be a positive integer"),
    ({"num_attention_heads": 8192}, r"'num_attention_heads' must be a positive integer \(at most 4096\)"),
    ({"num_attention_heads": 4096, "hidden_size": 1024}, "the heads would have no dimensions"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 0}, "'sliding_window' must be a positive integer"),
    ({"rope_scaling": "linear"}, "'rope_scaling' must be an object or null, got a JSON string"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, "'rope_scaling.factor' must be a finite number"),
    ({"rope_theta": 1.0}, "'rope_theta' must be a finite number greater than 1"),
    ({"rms_norm_eps": float("inf")}, "'rms_norm_eps' must be a finite number greater than 0"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ({"attention_bias": "no"}, "'attention_bias' must be true or false"),
    ({"bos_token_id": 32000}, r"'bos_token_id' must be a token id from 0 to vocab_size-1=31999"),
    ({"eos_token_id": [2, "x"]}, "'eos_token_id' must be a token id"),
])
def test_unsupported_configs_are_named_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**BASE, **change})


def test_from_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        ModelConfig.from_json(path)
    path.write_text(json.dumps({**BASE, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match=f"{path}: hidden_act"):
        ModelConfig.from_json(path)


def test_a_config_must_be_a_json_object():
    with pytest.raises(ConfigError, match="must be a JSON object {...}, got a JSON list"):
        ModelConfig.from_hf([BASE])


def test_encodings(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())  # UTF-8 with a byte-order mark: fine
    assert ModelConfig.from_json(path) == ModelConfig.from_hf(BASE)
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        path.write_text(json.dumps(BASE), encoding=encoding)
        with pytest.raises(ConfigError, match=f"{path}: encoded as UTF-16 or UTF-32; it must be UTF-8"):
            ModelConfig.from_json(path)
    path.write_bytes(b'{"architectures": ["\xe9"]}')
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 \\(byte 0xe9 at offset 20\\)"):
        ModelConfig.from_json(path)
    path.write_text("[" * 100_000)
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        ModelConfig.from_json(path)


def test_an_oversized_json_file_is_refused_unread(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(100_000_001)  # sparse: takes no disk space
    with pytest.raises(ConfigError, match=f"{path}: 100000001 bytes, too large for a JSON settings file"):
        ModelConfig.from_json(path)
