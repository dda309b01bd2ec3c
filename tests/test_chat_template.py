"""Chat prompts rendered from the checkpoint's own Jinja template, compared with transformers."""

import json

import pytest

from minillm.tokenizer import ChatTemplate, TokenizerError, load_tokenizer
from tests import test_tokenizer
from tests.test_tokenizer import LLAMA2_CHAT_TEMPLATE, MISTRAL_CHAT_TEMPLATE

CONVERSATIONS = test_tokenizer.CONVERSATIONS + [
    [{"role": "user", "content": "Q: 2+2?\nA:"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Q: <b>3+3</b> & \"quotes\"?\nA:"}],
]


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_prompts_match_transformers(smollm2, transformers_smollm2, messages, add_generation_prompt):
    expected = transformers_smollm2.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
    assert smollm2.apply_chat_template(messages, add_generation_prompt) == expected


def test_the_embedded_template_is_the_one_in_tokenizer_config(smollm2, smollm2_dir):
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert smollm2.chat_format().source == config["chat_template"]
    assert "<|im_start|>system" in smollm2.apply_chat_template(CONVERSATIONS[0])  # its default system turn


@pytest.mark.parametrize("template", [LLAMA2_CHAT_TEMPLATE, MISTRAL_CHAT_TEMPLATE], ids=["llama2", "mistral"])
def test_inst_templates_render_like_transformers_with_their_bos_and_eos(smollm2_dir, template):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"),
                                                     bos_token="<s>", eos_token="</s>")
    ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>")
    for messages in CONVERSATIONS:
        if template == MISTRAL_CHAT_TEMPLATE:
            messages = [m for m in messages if m["role"] != "system"]
        assert ours.render(messages) == reference.apply_chat_template(messages, chat_template=template, tokenize=False)


def test_raise_exception_in_a_template_is_a_tokenizer_error():
    with pytest.raises(TokenizerError, match="roles must alternate"):
        ChatTemplate(MISTRAL_CHAT_TEMPLATE, "<s>", "</s>").render([{"role": "assistant", "content": "Hi"}])


def test_tojson_keeps_the_text_as_written():
    template = ChatTemplate("{{ messages[0]['content'] | tojson }}")
    assert template.render([{"role": "user", "content": "<b> & é"}]) == '"<b> & é"'


def test_templates_run_sandboxed_and_bad_syntax_is_one_line():
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="chat template"):
        escape.render([])
    with pytest.raises(TokenizerError, match="not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}").render([])
