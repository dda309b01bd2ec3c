"""The small public API: load a model with its tokenizer, generate text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minillm.checkpoint import load_model, resolve_checkpoint
from minillm.config import read_json_file
from minillm.errors import CheckpointError, UsageError
from minillm.generate import Sampling, generate_tokens
from minillm.inputs import check_count, check_device, check_prompt_texts
from minillm.manipulation import Manipulation
from minillm.model import Transformer
from minillm.tokenizer import Tokenizer, check_vocabulary, load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    """A floating torch dtype from its name ("bfloat16", "bf16", ...) or itself."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UsageError(f"{name} must be one of auto, {', '.join(DTYPES)}, got {str(dtype)[:40]!r}")
    return DTYPES[dtype]


def auto_dtype(folder: Path, device: torch.device) -> torch.dtype:
    """What `dtype="auto"` means: on a GPU the checkpoint's own dtype (config.json's `torch_dtype`, or
    `dtype` as transformers 5 writes it; float32 when it names none), on the CPU float32 (where half
    precision is slower on most CPUs, and a 135M model is small anyway)."""
    if device.type == "cpu":
        return torch.float32
    raw = read_json_file(folder / "config.json", CheckpointError)
    stored = raw.get("torch_dtype") or raw.get("dtype") if isinstance(raw, dict) else None
    return DTYPES.get(stored, torch.float32) if isinstance(stored, str) else torch.float32


def load(name_or_path: str = "smollm2-135m", dtype: str | torch.dtype = "auto",
         device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from an embedded name, a local folder or an `org/name` in the local HF cache.
    dtype: a name ("bfloat16", "bf16", ...), a torch dtype, or "auto" (see `auto_dtype`)."""
    device = check_device(device)
    dtype = None if dtype == "auto" else parse_dtype(dtype)
    folder = resolve_checkpoint(name_or_path)
    dtype = dtype or auto_dtype(folder, device)
    model = load_model(name_or_path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(folder)
    check_vocabulary(tokenizer, model.config.vocab_size, folder / "config.json")
    return model, tokenizer


class TextStreamer:
    """Turns one sequence's tokens into text as they come, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self.write(text[self.printed:])
        self.printed = len(text)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 64, *,
             sampling: Sampling | None = None, manipulation: Manipulation | None = None, mode: str = "cached",
             chat: bool = False, stream: Callable[[str], None] | None = None, compile: bool = False) -> str | list[str]:
    """Continue a prompt (or a batch of prompts) and return the new text.

    chat=True wraps each prompt as a user message in the model's chat format.
    stream receives the first sequence's text piece by piece as it is generated.
    compile=True compiles the decode step with torch.compile (see `generate_tokens`).
    """
    prompts = check_prompt_texts(prompt)
    check_count(max_new_tokens, "max_new_tokens")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    token_ids = [tokenizer.encode(p) for p in prompts]
    streamer = TextStreamer(tokenizer, stream) if stream is not None else None
    eos = set(tokenizer.eos_ids)
    result = generate_tokens(
        model, token_ids, max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, sampling=sampling,
        manipulation=manipulation, mode=mode, compile=compile,
        on_token=(lambda b, t: streamer(t) if b == 0 and t not in eos else None) if streamer else None)
    texts = [tokenizer.decode([t for t in tokens if t not in eos]) for tokens in result.tokens]
    return texts[0] if isinstance(prompt, str) else texts
