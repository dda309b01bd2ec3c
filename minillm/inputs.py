"""Checks of what callers hand to minillm: device, threads, sampling settings, prompts and token ids.

Each check raises a `UsageError` naming the argument, or the flag when the command
line passes its name (`name="--temperature"`), so the same rule gives the same
message wherever the value comes from.

Prompts longer than the model's context are refused, not warned about: positions
beyond `max_position_embeddings` were never trained, so what a model generates
there is not a result, and a warning scrolls past in a sweep of thousands of
prompts. The bound counts the prompt plus `max_new_tokens` (the most the model
may be asked to write), as serving systems do, so that whether a run is refused
never depends on when the model happens to stop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from minillm.errors import UsageError

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """The torch device named by `device`, refused unless this machine has it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{name} {_shown(device)} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if parsed.type not in DEVICE_TYPES:
        raise UsageError(f"{name} {_shown(device)}: minillm runs on {', '.join(DEVICE_TYPES)}, not {parsed.type}")
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        build = f" (this torch {torch.__version__} was built without CUDA)" if (
            parsed.type == "cuda" and torch.version.cuda is None) else ""
        raise UsageError(f"{name} {_shown(device)}: no {parsed.type} device is available on this machine{build}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"{name} {_shown(device)}: this machine has {count} {parsed.type} device(s), "
                         f"numbered from 0")
    return parsed


def check_threads(threads: int | None, name: str = "threads") -> None:
    """None (torch's choice) or a positive whole number of CPU threads."""
    if threads is not None:
        check_count(threads, name, minimum=1)


def check_count(value, name: str, minimum: int = 0) -> int:
    """A whole number (not a float, not a bool) of at least `minimum`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"{name} must be >= {minimum} (a whole number), got {_shown(value)}")
    return int(value)


def check_temperature(value, name: str = "temperature") -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a finite number >= 0 (0 = greedy), got {_shown(value)}")
    return float(value)


def check_top_p(value, name: str = "top_p") -> float:
    if not _is_real(value) or not 0 < value <= 1:  # NaN fails both comparisons
        raise UsageError(f"{name} must be a number in (0, 1], got {_shown(value)}")
    return float(value)


def check_sampling(sampling) -> None:
    """A `Sampling` whose fields were changed after it was made, or made from NaN, is refused too."""
    if sampling is None:
        return
    check_temperature(sampling.temperature, "sampling.temperature")
    check_top_p(sampling.top_p, "sampling.top_p")
    check_count(sampling.top_k, "sampling.top_k")


def check_prompt_texts(prompt, name: str = "prompt") -> list[str]:
    """A prompt or a non-empty list of prompts, as a list of text that encodes to UTF-8.

    A command-line argument that is not UTF-8 reaches Python as lone surrogates
    (U+DC80..U+DCFF, one per undecodable byte); they are refused here, naming the byte.
    """
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise UsageError(f"{name} must be a string or a non-empty list of strings, got {_shown(prompt)}")
    for index, text in enumerate(prompts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            which = name if isinstance(prompt, str) else f"{name}[{index}]"
            char = ord(text[e.start])
            byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
            raise UsageError(f"{which} is not valid UTF-8 text: {byte} at character {e.start}") from None
    return prompts


def check_fits_context(prompt_tokens: int, max_new_tokens: int, config, name: str) -> None:
    """Refuse a prompt (called `name` in the error) whose answer would reach past the model's context."""
    context = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > context:
        raise UsageError(
            f"{name} has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} positions, beyond the model's context of {context} "
            f"(max_position_embeddings in config.json); "
            + (f"ask for at most {context - prompt_tokens} new tokens" if prompt_tokens < context
               else "shorten the prompt"))


def check_generation(config, prompts, max_new_tokens, *, sampling=None, pad_id=0, eos_ids=(),
                     manipulation=None) -> None:
    """Everything `generate_tokens` is handed, checked against the model's `config` before any compute."""
    check_count(max_new_tokens, "max_new_tokens")
    check_sampling(sampling)
    _check_token_id(pad_id, "pad_id", config.vocab_size)
    for eos in eos_ids:
        check_count(eos, "eos_ids", minimum=0)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, torch.Tensor)) or len(prompts) == 0:
        raise UsageError(f"prompts must be a non-empty list of token-id lists, got {_shown(prompts)}")
    for index, prompt in enumerate(prompts):
        ids = _token_list(prompt, f"prompts[{index}]")
        if not ids:
            raise UsageError(f"prompts[{index}] is empty: every prompt needs at least one token")
        _check_token_ids(ids, f"prompts[{index}]", config.vocab_size)
        check_fits_context(len(ids), max_new_tokens, config, f"prompts[{index}]")
    vectors = getattr(manipulation, "vectors", None)
    if vectors is not None and not (vectors.is_floating_point() and torch.isfinite(vectors).all()):
        raise UsageError("manipulation vectors must be finite floating-point numbers")


def _token_list(prompt, name: str) -> list:
    """The token ids of one prompt: a list or tuple of ints, or a 1-D integer tensor."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise UsageError(f"{name} must be a 1-D integer tensor of token ids, got {prompt.dtype} "
                             f"of shape {list(prompt.shape)}")
        return prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise UsageError(f"{name} must be a list of token ids, got {_shown(prompt)}")
    return list(prompt)


def _check_token_ids(ids: list, name: str, vocab_size: int) -> None:
    if all(type(token) is int for token in ids) and 0 <= min(ids) and max(ids) < vocab_size:
        return  # the usual case, checked without a Python call per token
    for token in ids:
        _check_token_id(token, name, vocab_size)


def _check_token_id(token, name: str, vocab_size: int) -> None:
    if not isinstance(token, numbers.Integral) or isinstance(token, bool) or not 0 <= token < vocab_size:
        raise UsageError(f"{name}: token id {_shown(token)} is not in the model's vocabulary (0..{vocab_size - 1})")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
