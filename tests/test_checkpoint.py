"""Checkpoint finding and loading: every supported layout loads exactly, every broken one fails clearly.

The reference checkpoints are tiny random `transformers` Llama models saved in
Hugging Face's own formats; weights must come back bit for bit and give the same
logits as transformers.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillm.checkpoint as checkpoint
from minillm.checkpoint import CheckpointError, check_manifest, load_manifest, load_model, resolve_checkpoint
from minillm.config import ConfigError, ModelConfig
from minillm.model import Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def make_hf_model(**overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    """The tiny model saved as one model.safetensors; tests copy it before breaking it."""
    folder = tmp_path_factory.mktemp("tiny")
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    """A private copy of the saved model that a test may damage."""
    return shutil.copytree(saved, tmp_path / "model")


def assert_same_as_hf(model, hf_model):
    hf_state = hf_model.state_dict()
    ours = model.state_dict()
    assert set(ours) == {name.removeprefix("model.") for name in hf_state}
    for name, tensor in ours.items():
        hf_name = name if name == "lm_head.weight" else "model." + name
        assert torch.equal(tensor, hf_state[hf_name]), name
    input_ids = torch.tensor([[1, 5, 9, 77, 3, 120, 64]])
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        assert torch.allclose(model(input_ids), expected, atol=1e-5, rtol=0)


def write_hf_state(folder, state, file_name="model.safetensors"):
    """Replace the folder's weights with `state` (Hugging Face names)."""
    save_file(state, folder / file_name)


# ----------------------------------------------------------------------------- layouts that load

def test_single_safetensors_loads_exactly(saved, hf_model):
    assert (saved / "model.safetensors").is_file()
    model = load_model(saved)
    assert isinstance(model, Transformer) and not model.training
    assert model.config == ModelConfig.from_json(saved / "config.json")
    assert_same_as_hf(model, hf_model)


def test_sharded_safetensors_loads_exactly(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_as_hf(load_model(tmp_path), hf_model)


def test_pytorch_bin_loads_exactly(saved, hf_model, tmp_path):
    shutil.copy(saved / "config.json", tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_as_hf(load_model(tmp_path), hf_model)


def test_legacy_pytorch_bin_loads_exactly(saved, hf_model, tmp_path):
    # torch.save's format before PyTorch 1.6 (not a zip file): read with the weights-only unpickler, without mmap
    shutil.copy(saved / "config.json", tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same_as_hf(load_model(tmp_path), hf_model)


def test_sharded_pytorch_bin_loads_exactly(saved, hf_model, tmp_path):
    shutil.copy(saved / "config.json", tmp_path)
    state = hf_model.state_dict()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file_name, shard_names in halves.items():
        torch.save({name: state[name] for name in shard_names}, tmp_path / file_name)
    weight_map = {name: file_name for file_name, shard_names in halves.items() for name in shard_names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_as_hf(load_model(tmp_path), hf_model)


def test_tied_embeddings_reuse_the_embedding(tmp_path):
    hf_model = make_hf_model(tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert_same_as_hf(model, hf_model)


def test_bf16_cast_happens_at_load(saved, hf_model, monkeypatch):
    handed_over = {}
    original = Transformer.load_state_dict

    def spy(self, state, *args, **kwargs):
        handed_over.update(state)
        return original(self, state, *args, **kwargs)

    monkeypatch.setattr(Transformer, "load_state_dict", spy)
    model = load_model(saved, dtype=torch.bfloat16)
    # The tensors reach the model already in bf16, and the model adopts them without a copy.
    assert {t.dtype for t in handed_over.values()} == {torch.bfloat16}
    assert model.embed_tokens.weight.data_ptr() == handed_over["embed_tokens.weight"].data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf_q = hf_model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(model.state_dict()["layers.1.self_attn.q_proj.weight"], hf_q.to(torch.bfloat16))


def test_recomputed_rope_tables_in_old_checkpoints_are_ignored(folder, hf_model):
    state = dict(hf_model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    write_hf_state(folder, state)
    assert_same_as_hf(load_model(folder), hf_model)


# ----------------------------------------------------------------------------- broken checkpoints

def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"model/config\.json: missing"):
        load_model(folder)


def test_unsupported_architecture_reaches_the_user(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architectures \['GPT2LMHeadModel'\]"):
        load_model(folder)


def test_truncated_safetensors(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        load_model(folder)


def test_truncated_pytorch_bin(saved, hf_model, tmp_path):
    shutil.copy(saved / "config.json", tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    torch.save(hf_model.state_dict(), weights)
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: truncated or corrupt PyTorch file"):
        load_model(tmp_path)


def test_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(CheckpointError, match=rf"{last.name}: missing, but model\.safetensors\.index\.json lists it"):
        load_model(tmp_path)


def test_no_weights_at_all(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights \(looked for model\.safetensors"):
        load_model(folder)


def test_wrong_shape_names_tensor_and_shapes(folder, hf_model):
    state = dict(hf_model.state_dict())
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 32)
    write_hf_state(folder, state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                              r"has shape \(48, 32\), but config\.json implies \(64, 32\)"):
        load_model(folder)


def test_missing_tensor_is_named(folder, hf_model):
    state = dict(hf_model.state_dict())
    del state["model.layers.0.post_attention_layernorm.weight"]
    write_hf_state(folder, state)
    with pytest.raises(CheckpointError, match=r"lack 1 tensor\(s\): layers\.0\.post_attention_layernorm\.weight$"):
        load_model(folder)


def test_untied_checkpoint_without_lm_head_is_missing_it(folder, hf_model):
    state = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    write_hf_state(folder, state)
    with pytest.raises(CheckpointError, match=r"lack 1 tensor\(s\): lm_head\.weight"):
        load_model(folder)


def test_unexpected_tensors_are_named(folder, hf_model):
    state = dict(hf_model.state_dict())
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    state["model.layers.5.mlp.up_proj.weight"] = torch.zeros(64, 32)
    write_hf_state(folder, state)
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) that the model described by config\.json does not "
                                              r"have: model\.layers\.0\.self_attn\.q_proj\.bias, "
                                              r"model\.layers\.5\.mlp\.up_proj\.weight"):
        load_model(folder)


# ----------------------------------------------------------------------------- finding checkpoints

def fake_hf_cache(tmp_path, saved, commits=("abc123",), ref="abc123"):
    """A Hugging Face cache holding repository acme/tiny, one snapshot per commit."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    for commit in commits:
        shutil.copytree(saved, repo / "snapshots" / commit)
    if ref is not None:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(ref + "\n")
    return repo


def test_org_name_resolves_through_refs_main(saved, tmp_path, monkeypatch):
    repo = fake_hf_cache(tmp_path, saved, commits=("old111", "abc123"), ref="abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint("acme/tiny") == repo / "snapshots" / "abc123"
    assert torch.equal(load_model("acme/tiny").norm.weight, load_model(saved).norm.weight)


def test_org_name_uses_the_only_snapshot_and_hf_home(saved, tmp_path, monkeypatch):
    repo = fake_hf_cache(tmp_path, saved, ref=None)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the cache is then $HF_HOME/hub
    assert resolve_checkpoint("acme/tiny") == repo / "snapshots" / "abc123"


def test_several_snapshots_without_ref_is_an_error(saved, tmp_path, monkeypatch):
    fake_hf_cache(tmp_path, saved, commits=("aaa", "bbb"), ref=None)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"models--acme--tiny: no refs/main and 2 snapshots \(aaa, bbb\)"):
        resolve_checkpoint("acme/tiny")


@pytest.mark.parametrize("ref", ["../../../elsewhere", "abc/../../x", "/etc", "..", "a b", ""])
def test_refs_main_must_be_a_plain_commit_name(saved, tmp_path, monkeypatch, ref):
    fake_hf_cache(tmp_path, saved, ref=ref)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"refs/main: must hold a commit name"):
        resolve_checkpoint("acme/tiny")


def test_index_may_name_files_in_subfolders(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / "shards").mkdir()
    for shard in set(index["weight_map"].values()):
        shutil.move(tmp_path / shard, tmp_path / "shards" / shard)
    index["weight_map"] = {name: f"shards/{shard}" for name, shard in index["weight_map"].items()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_as_hf(load_model(tmp_path), hf_model)


def test_not_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("acme/nothing")
    message = str(error.value)
    assert "checkpoint 'acme/nothing' not found" in message
    assert "smollm2-135m" in message  # the embedded models it knows
    assert str(tmp_path / "hub" / "models--acme--nothing") in message
    assert "never contacts the Hugging Face Hub" in message


def test_embedded_name_builds_its_folder(saved, monkeypatch):
    from minillm import embedded
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "smollm2-135m", lambda: saved)
    assert resolve_checkpoint("smollm2-135m") == saved


# ----------------------------------------------------------------------------- the manifest

def fake_manifest(tmp_path, monkeypatch, saved, **entry_changes):
    """Point the loader at a manifest whose entry for acme/tiny matches `saved` except for entry_changes."""
    config = ModelConfig.from_json(saved / "config.json")
    entry = {
        "config": {"num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads,
                   "rope_theta": config.rope_theta, "sliding_window": None},
        "tokenizer": {"add_bos_token": None},
        "files": [{"name": "model.safetensors", "bytes": (saved / "model.safetensors").stat().st_size,
                   "sha256": None}],
    }
    entry.update(entry_changes)
    path = tmp_path / "weights_manifest.json"
    path.write_text(json.dumps({"models": {"acme/tiny": entry}}))
    monkeypatch.setattr(checkpoint, "MANIFEST_PATH", path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return fake_hf_cache(tmp_path, saved) / "snapshots" / "abc123"


def test_matching_manifest_entry_passes(saved, tmp_path, monkeypatch):
    snapshot = fake_manifest(tmp_path, monkeypatch, saved)
    assert check_manifest("acme/tiny", snapshot, ModelConfig.from_json(snapshot / "config.json")) is not None
    load_model("acme/tiny")


def test_manifest_size_mismatch(saved, tmp_path, monkeypatch):
    fake_manifest(tmp_path, monkeypatch, saved,
                  files=[{"name": "model.safetensors", "bytes": 123, "sha256": None}])
    with pytest.raises(CheckpointError, match=r"abc123/model\.safetensors: \d+ bytes, but the manifest entry for "
                                              r"acme/tiny expects 123"):
        load_model("acme/tiny")


def test_manifest_config_mismatch_found_by_cache_folder(saved, tmp_path, monkeypatch):
    snapshot = fake_manifest(tmp_path, monkeypatch, saved,
                             config={"num_kv_heads": 8, "rope_theta": None})
    # Given as a plain path, the checkpoint is still recognised by the cache folder it sits in.
    with pytest.raises(CheckpointError, match=r"config\.json: num_kv_heads is 2, but the manifest entry for "
                                              r"acme/tiny expects 8"):
        load_model(snapshot)


def test_manifest_bos_mismatch(saved, tmp_path, monkeypatch):
    snapshot = fake_manifest(tmp_path, monkeypatch, saved, tokenizer={"add_bos_token": False})
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: add_bos_token is True, but the manifest "
                                              r"entry for acme/tiny expects False"):
        load_model("acme/tiny")


def test_unknown_checkpoints_are_not_checked(saved):
    assert check_manifest(str(saved), saved, ModelConfig.from_json(saved / "config.json")) is None


def test_real_manifest_is_well_formed():
    manifest = load_manifest()
    assert {"meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1", "01-ai/Yi-6B", "EleutherAI/llemma_7b",
            "smollm2-135m"} <= set(manifest)
    config_fields = set(ModelConfig.__dataclass_fields__)
    for name, entry in manifest.items():
        assert set(entry["config"]) <= config_fields, name  # every fact is one check_manifest can compare
        assert set(entry["tokenizer"]) == {"add_bos_token"}, name
        for file in entry["files"] or []:
            assert set(file) == {"name", "bytes", "sha256"}, name
        assert entry["obtain"] and entry["licence"], name


def test_stacked_projections_load_from_and_save_to_the_checkpoint_names(saved, hf_model):
    """q/k/v (and gate/up) are one matrix each in the model, rows in checkpoint order; state dicts keep the
    checkpoint's tensors, as views of those matrices (state_dict() copies nothing)."""
    model = load_model(saved)
    attention, mlp = model.layers[1].self_attn, model.layers[1].mlp
    hf = hf_model.state_dict()
    parts = [hf[f"model.layers.1.self_attn.{name}_proj.weight"] for name in "qkv"]
    assert torch.equal(attention.qkv_proj.weight, torch.cat(parts))
    assert torch.equal(mlp.gate_up_proj.weight,
                       torch.cat([hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]]))
    state = model.state_dict()
    assert not any("qkv_proj" in name or "gate_up_proj" in name for name in state)
    k_rows = attention.qkv_proj.weight[attention.num_heads * attention.head_dim:]
    assert state["layers.1.self_attn.k_proj.weight"].data_ptr() == k_rows.data_ptr()
    # and back: a state dict under the checkpoint's names loads into a fresh model
    fresh = Transformer(model.config)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.layers[1].self_attn.qkv_proj.weight, attention.qkv_proj.weight)
