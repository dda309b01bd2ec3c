"""Text <-> token ids for a Hugging Face checkpoint folder, with its BOS policy and chat format.

Two file formats hold a vocabulary, and `load_tokenizer` reads either:

    tokenizer.json    the `tokenizers` library's format (byte-level BPE for SmolLM2;
                      Llama-2 and Mistral ship one too). Preferred when present.
    tokenizer.model   a SentencePiece model (Llama-2, Mistral, Yi, Llemma).

Everything a vocabulary file does not say comes from the folder's json files:

    add_bos_token     `tokenizer_config.json`: whether `encode` starts with BOS. Llama-2,
                      Mistral and Llemma do; Yi and SmolLM2 do not. Getting this wrong
                      silently costs accuracy, so it is read, never guessed by model name.
    special tokens    `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`) and
                      `config.json` (`bos_token_id`, `eos_token_id`, `pad_token_id`).
    chat_template     a Jinja template, rendered with jinja2 the way transformers renders
                      it (see `ChatTemplate`), so any checkpoint's own chat format works.

Special tokens written in the text (`<|im_start|>`, `<s>`) are encoded as their single
ids, as transformers does, so a formatted chat prompt encodes correctly.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from minillm.config import read_json_file
from minillm.errors import TokenizerError

__all__ = ["Tokenizer", "TokenizerError", "check_vocabulary", "load_tokenizer"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class Tokenizer:
    """Encode and decode text for one checkpoint; build chat prompts in its format."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: tuple[int, ...], pad_id: int, add_bos: bool,
                 chat_template: str | None, source: Path):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.vocab_size = backend.vocab_size
        self.chat_template = chat_template
        self.source = source
        self.file = backend.path

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; a BOS is put first when `add_bos` (None: the checkpoint's policy) says so.

        Never a second BOS: a text that already starts with the BOS token (a formatted
        `[INST]` prompt does) keeps the one it has.
        """
        ids = self._backend.encode(text)
        wants_bos = self.add_bos if add_bos is None else add_bos
        if wants_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor); special tokens are dropped unless asked for."""
        return self._backend.decode([int(token_id) for token_id in ids], skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]) in this model's chat format."""
        return self.chat_format().render(messages, add_generation_prompt)

    def chat_format(self) -> ChatTemplate:
        """The model's chat template with the special-token texts it writes (bos_token, eos_token)."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: the model has no chat template (no chat_template in "
                                 "tokenizer_config.json), so it has no supported chat format")
        bos = None if self.bos_id is None else self._backend.token_text(self.bos_id)
        eos = self._backend.token_text(self.eos_ids[0]) if self.eos_ids else None
        return ChatTemplate(self.chat_template, bos_token=bos, eos_token=eos)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of the checkpoint folder `folder` (tokenizer.json preferred over tokenizer.model)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        backend = _JsonBackend(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        backend = _SentencePieceBackend(folder / "tokenizer.model")
    else:
        raise TokenizerError(f"{folder}: no tokenizer file (looked for {' and '.join(TOKENIZER_FILES)})")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    model_config = _read_json(folder / "config.json")
    special = _SpecialTokens(backend, tokenizer_config, folder / "tokenizer_config.json")
    config_ids = {key: _config_ids(model_config, key, folder / "config.json")
                  for key in ("bos_token_id", "eos_token_id", "pad_token_id")}

    bos_id = _first_known(special.id("bos_token"), *config_ids["bos_token_id"], backend.bos_id)
    eos_ids = _unique(special.id("eos_token"), *config_ids["eos_token_id"], backend.eos_id)
    pad_id = _first_known(special.id("pad_token"), *config_ids["pad_token_id"], *eos_ids)
    if pad_id is None:
        raise TokenizerError(f"{folder}: no pad or eos token (tokenizer_config.json has no eos_token, "
                             "config.json no eos_token_id)")
    add_bos = tokenizer_config.get("add_bos_token", backend.adds_bos_by_default)
    if not isinstance(add_bos, bool):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: field 'add_bos_token' must be true or false, "
                             f"got {str(add_bos)[:40]!r}")
    if add_bos and bos_id is None:
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: add_bos_token is true but no bos_token is defined")
    if not isinstance(tokenizer_config.get("chat_template"), (str, list, type(None))):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: field 'chat_template' must be a string or a list")
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, add_bos=bool(add_bos),
                     chat_template=_chat_template(folder, tokenizer_config), source=folder)


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int, config_path: Path) -> None:
    """Refuse a tokenizer that can produce token ids the model has no embedding for.

    A tokenizer smaller than the model is normal (embeddings are often padded to a round
    size); a larger one would index past the embedding as soon as such a token appears.
    """
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{tokenizer.file}: ids go up to {tokenizer.vocab_size - 1}, but {config_path} has "
                             f"vocab_size {vocab_size}: the model has no embedding for ids {vocab_size} and up")
    roles = {"bos": [tokenizer.bos_id], "eos": list(tokenizer.eos_ids), "pad": [tokenizer.pad_id]}
    for role, ids in roles.items():
        for token_id in ids:
            if token_id is not None and token_id >= vocab_size:
                raise TokenizerError(f"{tokenizer.source}: the {role} token id {token_id} is beyond {config_path}'s "
                                     f"vocab_size {vocab_size}")


# --- the two vocabulary backends ---------------------------------------------------------------

class _JsonBackend:
    """A `tokenizer.json` through the `tokenizers` library (what transformers' fast tokenizers use)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        try:
            self._tok = HFTokenizer.from_file(str(path))
            # Without an explicit add_bos_token, transformers' fast tokenizers add whatever the
            # file's post-processor adds: see whether it puts a token before an empty text.
            self._post_processor_prefix = self._tok.encode("", add_special_tokens=True).ids
        except Exception as e:  # noqa: BLE001  (the tokenizers library raises plain Exceptions)
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
        # One more than the largest id (ids need not be contiguous), not the number of tokens
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.bos_id = self.eos_id = None  # the file names no roles; the json configs do

    @property
    def adds_bos_by_default(self) -> bool:
        return bool(self._post_processor_prefix)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: the BOS is our decision (policy), not the post-processor's.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


class _SentencePieceBackend:
    """A SentencePiece `tokenizer.model` (Llama-2 style: we add BOS ourselves, per policy)."""

    adds_bos_by_default = True  # transformers' LlamaTokenizer default when tokenizer_config is silent

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001  (RuntimeError or OSError, depending on the damage)
            raise TokenizerError(f"{path}: not a valid SentencePiece tokenizer.model ({_first_line(e)})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = _known_id(self._sp.bos_id())  # SentencePiece says -1 for "none"
        self.eos_id = _known_id(self._sp.eos_id())
        # Control pieces (<s>, </s>) and <unk> are never produced from text by SentencePiece,
        # so we split them out of the text ourselves, as transformers does.
        special_ids = [i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)]
        self._special = {self._sp.id_to_piece(i): i for i in special_ids}
        longest_first = sorted(self._special, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._special_pattern.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                # Each stretch between special tokens gets SentencePiece's leading "▁", like
                # transformers' legacy Llama tokenizer: "<s>[INST]" -> <s>, "▁[", "INST", "]".
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        special_ids = set(self._special.values())
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in special_ids])
        # SentencePiece decodes control tokens to nothing: write them out between decoded stretches.
        pieces, stretch = [], []
        for token_id in ids:
            if token_id in special_ids:
                pieces += [self._sp.decode(stretch), self._sp.id_to_piece(token_id)]
                stretch = []
            else:
                stretch.append(token_id)
        return "".join(pieces + [self._sp.decode(stretch)])

    def token_id(self, text: str) -> int | None:
        token_id = self._sp.piece_to_id(text)
        # Unknown pieces map to the <unk> id; tell that apart from asking for "<unk>" itself.
        return token_id if self._sp.id_to_piece(token_id) == text else None

    def token_text(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


# --- reading the json files --------------------------------------------------------------------

class _SpecialTokens:
    """Ids of the special tokens that `tokenizer_config.json` names (as text, or {"content": text})."""

    def __init__(self, backend, tokenizer_config: dict, path: Path):
        self._backend, self._config, self._path = backend, tokenizer_config, path

    def id(self, field: str) -> int | None:
        value = self._config.get(field)
        text = value.get("content") if isinstance(value, dict) else value
        if text is None:
            return None
        if not isinstance(text, str):
            raise TokenizerError(f"{self._path}: field {field!r} must be a token's text, got {str(text)[:40]!r}")
        token_id = self._backend.token_id(text)
        if token_id is None:
            raise TokenizerError(f"{self._path}: {field} {text!r} is not in the vocabulary")
        return token_id


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    content = read_json_file(path, TokenizerError)
    if not isinstance(content, dict):
        raise TokenizerError(f"{path}: must be a JSON object {{...}}, got a {type(content).__name__}")
    return content


def _config_ids(config: dict, key: str, path: Path) -> list[int]:
    """The token id(s) of a config.json field (eos_token_id may be a list), each a whole number >= 0."""
    ids = _as_list(config.get(key))
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise TokenizerError(f"{path}: field {key!r} must be a token id (a whole number >= 0), "
                                 f"got {str(token_id)[:40]!r}")
    return ids


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The Jinja chat template: `chat_template` in tokenizer_config.json, else a chat_template.jinja file."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((entry["template"] for entry in template if entry.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _known_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first_known(*candidates):
    return next((c for c in candidates if c is not None), None)


def _unique(*candidates) -> tuple[int, ...]:
    """The non-None candidates, first occurrence kept, in order."""
    return tuple(dict.fromkeys(c for c in candidates if c is not None))


# --- chat formats ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Jinja chat template and the special-token texts it may write.

    Rendered as transformers renders `apply_chat_template`: a sandboxed Jinja environment (a
    template is data from the internet, so it must not reach Python objects), blocks trimmed,
    loop controls, and the helpers templates call: `raise_exception(message)`, `tojson`,
    `strftime_now(format)`. The variables are `messages`, `add_generation_prompt`, `bos_token`
    and `eos_token`.
    """

    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template's own `raise_exception` becomes a TokenizerError."""
        import jinja2

        try:
            return _compile_chat_template(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"chat template: {error}") from None


@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"chat template: not a valid Jinja template ({error})") from None


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
