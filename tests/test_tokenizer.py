"""minillm.tokenizer against independent references: llama.cpp, SentencePiece, transformers."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import sentencepiece

from minillm.assets import wheel_member
from minillm.tokenizer import TokenizerError, check_vocabulary, load_tokenizer

MISTRAL_SP_MODEL = ("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1")

# Texts where tokenizers tend to disagree: whitespace runs, digits, non-Latin scripts, emoji
# (with zero-width joiners), code, and special tokens written inside the text.
CORPUS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "  two  spaces   three    ",
    "line one\nline two\n\nthree\r\nwindows\n",
    "tab\tseparated\t\tvalues\t",
    "12345 and 3.14 and 1,000,000 and 2024-11-27",
    "café naïve résumé Ångström Größe straße",
    "日本語のテキスト 中文 한국어",
    "emoji 🦙🚀 and 👩\u200d👩\u200d👧",
    "Ελληνικά и русский",
    "\u00a0non-breaking\u2009thin space",
    "def f(x):\n    return x**2  # square\n",
    "if (a != b && c >= d) { return; }",
    "don't it's we'll I'M",
    "https://example.com/a?b=c&d=e",
    "<|im_start|>user\nHi<|im_end|>\n",
    "text<|im_start|>glued<|im_end|>more",
    " <|im_end|> ",
    "<|endoftext|>",
    "   ",
    "\n\n\n",
    "a" * 50,
]

# Llama-2-chat's and Mistral-7B-Instruct-v0.1's chat templates as published on the Hub.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": " Rome "},
     {"role": "user", "content": "And of Spain?\n"}],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def mistral_sp_model():
    return wheel_member(*MISTRAL_SP_MODEL)


def make_folder(path, sp_model=None, tokenizer_json=None, **json_files):
    """A checkpoint folder with the given tokenizer files and json files (name without .json -> content)."""
    path.mkdir(parents=True, exist_ok=True)
    if sp_model is not None:
        shutil.copy(sp_model, path / "tokenizer.model")
    if tokenizer_json is not None:
        shutil.copy(tokenizer_json, path / "tokenizer.json")
    for name, content in json_files.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, mistral_sp_model):
    folder = make_folder(tmp_path_factory.mktemp("mistral"), sp_model=mistral_sp_model,
                         tokenizer_config={"add_bos_token": True})
    return load_tokenizer(folder)


# --- SmolLM2 (tokenizer.json) against llama.cpp on the original GGUF -----------------------------

@pytest.fixture(scope="module")
def llama_cpp(smollm2_gguf):
    """POST to llama.cpp's own tokenizer endpoints, served in-process by the xllamacpp wheel."""
    xllamacpp = pytest.importorskip("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = str(smollm2_gguf)
    params.n_ctx, params.port, params.warmup = 256, 0, False  # port 0: any free port on 127.0.0.1
    server = xllamacpp.Server(params)
    address = server.listening_address

    def post(endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(address + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    yield post
    del server


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_encodes_like_llama_cpp(smollm2, llama_cpp, text):
    # parse_special: special tokens written in the text become their ids, as in minillm.
    expected = llama_cpp("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
    assert smollm2.encode(text) == expected


def test_smollm2_decodes_like_llama_cpp(smollm2, llama_cpp):
    for text in CORPUS:
        ids = llama_cpp("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]
        assert smollm2.decode(ids, skip_special_tokens=False) == llama_cpp("/detokenize", {"tokens": ids})["content"]


def test_smollm2_matches_transformers_reading_of_the_same_file(smollm2, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))
    for text in CORPUS:
        assert smollm2.encode(text) == reference.encode(text, add_special_tokens=False)


def test_smollm2_round_trips_and_skips_special_tokens(smollm2):
    for text in CORPUS:
        assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text
    assert smollm2.decode(smollm2.encode("<|im_start|>user\nHi<|im_end|>\n")) == "user\nHi\n"


def test_smollm2_special_ids_and_bos_policy(smollm2):
    # From the GGUF metadata: no BOS is added; <|im_start|> = 1, <|im_end|> = 2 (eos and pad).
    assert (smollm2.add_bos, smollm2.bos_id, smollm2.eos_ids, smollm2.pad_id) == (False, 1, (2,), 2)
    assert smollm2.vocab_size == 49152
    plain = smollm2.encode("Hello")
    assert smollm2.encode("Hello", add_bos=True) == [1] + plain
    assert smollm2.encode("<|im_start|>Hello", add_bos=True) == [1] + plain  # never a doubled BOS


def test_smollm2_chat_prompt_matches_transformers_with_the_gguf_template(smollm2, smollm2_dir, smollm2_gguf_reader):
    transformers = pytest.importorskip("transformers")
    template = smollm2_gguf_reader.fields["tokenizer.chat_template"].contents()
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            assert smollm2.apply_chat_template(messages, add_generation_prompt) == expected


# --- Mistral-7B's SentencePiece model ------------------------------------------------------------

def test_mistral_encodes_the_known_ids(mistral):
    # Mistral-7B's ids for this sentence, BOS (<s> = 1) first as its tokenizer_config asks.
    assert mistral.encode("The capital of France is Paris.") == [1, 415, 5565, 302, 4843, 349, 5465, 28723]
    # Mistral's instruct prompts start <s> "▁[" "INST" "]" = 1, 733, 16289, 28793.
    assert mistral.encode("<s>[INST] Hi [/INST]")[:4] == [1, 733, 16289, 28793]
    assert (mistral.add_bos, mistral.bos_id, mistral.eos_ids, mistral.pad_id) == (True, 1, (2,), 2)
    assert mistral.vocab_size == 32000


def test_mistral_matches_sentencepiece_on_the_corpus(mistral, mistral_sp_model):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_sp_model))
    for text in CORPUS:
        ids = mistral.encode(text, add_bos=False)
        assert ids == reference.encode(text)
        assert mistral.decode(ids) == reference.decode(ids) == text


def test_mistral_writes_special_tokens_when_asked(mistral):
    ids = mistral.encode("Hi</s>")
    assert ids[0] == 1 and ids[-1] == 2
    assert mistral.decode(ids) == "Hi"
    assert mistral.decode(ids, skip_special_tokens=False) == "<s>Hi</s>"


@pytest.mark.parametrize("template", [LLAMA2_CHAT_TEMPLATE, MISTRAL_CHAT_TEMPLATE], ids=["llama2", "mistral"])
def test_inst_chat_prompts_match_transformers(tmp_path, mistral_sp_model, smollm2_dir, template):
    transformers = pytest.importorskip("transformers")
    folder = make_folder(tmp_path, sp_model=mistral_sp_model,
                         tokenizer_config={"add_bos_token": True, "chat_template": template})
    ours = load_tokenizer(folder)
    # Rendering a template only needs the bos/eos strings; any tokenizer file will do for transformers.
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"),
                                                     bos_token="<s>", eos_token="</s>")
    conversations = CONVERSATIONS if template == LLAMA2_CHAT_TEMPLATE else [
        [m for m in conversation if m["role"] != "system"] for conversation in CONVERSATIONS]
    for messages in conversations:
        expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False)
        prompt = ours.apply_chat_template(messages)
        assert prompt == expected
        ids = ours.encode(prompt)
        assert ids[:4] == [1, 733, 16289, 28793]
        assert ids.count(1) == prompt.count("<s>")  # the prompt's own BOS, not one more


def test_inst_format_rejects_turns_out_of_order(tmp_path, mistral_sp_model):
    folder = make_folder(tmp_path, sp_model=mistral_sp_model,
                         tokenizer_config={"add_bos_token": True, "chat_template": MISTRAL_CHAT_TEMPLATE})
    with pytest.raises(TokenizerError, match="alternate"):
        load_tokenizer(folder).apply_chat_template([{"role": "assistant", "content": "Hi"}])


# --- choosing files and reading the json configs ------------------------------------------------

def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path, mistral_sp_model, smollm2_dir):
    folder = make_folder(tmp_path, sp_model=mistral_sp_model, tokenizer_json=smollm2_dir / "tokenizer.json",
                         tokenizer_config={"eos_token": "<|im_end|>"})
    tokenizer = load_tokenizer(folder)
    assert tokenizer.vocab_size == 49152
    assert tokenizer.encode("Hello") == [19556]  # the BPE id, not SentencePiece's 22557


def test_eos_ids_include_config_json_and_pad_falls_back_to_eos(tmp_path, mistral_sp_model):
    folder = make_folder(tmp_path, sp_model=mistral_sp_model, config={"eos_token_id": [2, 31999]},
                         tokenizer_config={"add_bos_token": False, "eos_token": {"content": "</s>"}})
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_ids == (2, 31999)
    assert tokenizer.pad_id == 2
    assert tokenizer.encode("Hi")[0] != 1


def test_a_folder_without_tokenizer_files_names_what_was_looked_for(tmp_path):
    make_folder(tmp_path, config={"vocab_size": 10})
    with pytest.raises(TokenizerError) as raised:
        load_tokenizer(tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message


def test_a_model_without_a_chat_template_says_so_and_any_other_template_renders(tmp_path, mistral_sp_model):
    no_template = load_tokenizer(make_folder(tmp_path / "a", sp_model=mistral_sp_model))
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "Hi"}])
    other_template = load_tokenizer(make_folder(
        tmp_path / "b", sp_model=mistral_sp_model,
        tokenizer_config={"chat_template": "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"}))
    assert other_template.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<|user|>Hi"


def test_an_unknown_special_token_is_a_clear_error(tmp_path, mistral_sp_model):
    make_folder(tmp_path, sp_model=mistral_sp_model, tokenizer_config={"eos_token": "<|eot|>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '<\|eot\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "field 'add_bos_token' must be true or false"),
    ("tokenizer_config.json", {"eos_token": 5}, "field 'eos_token' must be a token's text"),
    ("tokenizer_config.json", {"chat_template": 3}, "field 'chat_template' must be a string or a list"),
    ("tokenizer_config.json", ["not", "an", "object"], "must be a JSON object"),
    ("config.json", {"pad_token_id": "0"}, "field 'pad_token_id' must be a token id"),
    ("config.json", {"eos_token_id": [2, -1]}, "field 'eos_token_id' must be a token id"),
])
def test_bad_fields_in_the_json_files_are_named(tmp_path, smollm2_dir, file, content, message):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(smollm2_dir / name, tmp_path)
    original = json.loads((tmp_path / file).read_text())
    (tmp_path / file).write_text(json.dumps({**original, **content} if isinstance(content, dict) else content))
    with pytest.raises(TokenizerError, match=f"{tmp_path / file}: .*{message}"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer.model"])
def test_damaged_vocabulary_files_are_named(tmp_path, file):
    (tmp_path / file).write_bytes(b"\x00\xffnot a tokenizer" * 10)
    with pytest.raises(TokenizerError, match=f"{tmp_path / file}: not a valid"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_larger_than_the_model_is_refused(smollm2, smollm2_dir):
    check_vocabulary(smollm2, 49152, smollm2_dir / "config.json")  # SmolLM2's own: they agree
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: ids go up to 49151, but .*config\.json has "
                                             r"vocab_size 49000"):
        check_vocabulary(smollm2, 49000, smollm2_dir / "config.json")
