"""How much memory batched generation needs, and the largest batch that fits a budget (`--batch-size auto`).

The estimate counts what grows with the batch, per sequence of `prompt + new` tokens, with the weights
already loaded (they do not grow with it):

- the KV cache: keys and values of every layer for every position, 2 x L x kv_heads x head_dim x positions;
- the unmanipulated prompt states a sweep shares between runs (`PromptStates`): H [L+1, prompt, D], and
  their KV cache beside each run's own one: a run at layer k copies the layers >= k (`KVCache.fork`),
  all of them at k = 0, so a second whole cache at worst;
- the largest transient of the prompt's pass, one layer at a time: the MLP's gate, up and their
  product [prompt, intermediate], the attention's queries, keys, values and output and the residual
  stream and its norm [prompt, D] (norms in fp32), and the additive mask [prompt, positions];
- the last position's logits, in the model's dtype and in fp32.

It is an estimate: torch's allocator and attention kernels keep some workspace of their own, hence the
`headroom` fraction of the budget left free.
"""

from __future__ import annotations

import os

import torch

from minillm.config import ModelConfig


def bytes_per_sequence(config: ModelConfig, dtype: torch.dtype, prompt_tokens: int, new_tokens: int,
                       prompt_states: bool = True) -> int:
    """Bytes one more sequence in the batch costs, at its peak (see the module's docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    positions = prompt_tokens + new_tokens
    L, D = config.num_layers, config.hidden_size
    kv_cache = 2 * L * config.num_kv_heads * config.head_dim * positions * size
    # Shared prompt states: H, and their cache beside the run's own (a run at k = 0 copies every layer of it).
    shared = (L + 1) * prompt_tokens * D * size + kv_cache if prompt_states else 0
    attention_width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    layer = prompt_tokens * (3 * config.intermediate_size * size  # gate, up, their product
                             + (attention_width + config.num_heads * config.head_dim + 2 * D) * size
                             + 2 * D * 4  # the norm's fp32 copy and result
                             + positions * size)  # the additive mask's row
    logits = config.vocab_size * (size + 4)
    return kv_cache + shared + layer + logits


def memory_budget(device: torch.device | str, cpu_share: float = 0.5) -> int:
    """Bytes free for activations: the device's free memory on a GPU, `cpu_share` of the available RAM on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return int(available_ram() * cpu_share)


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def auto_batch_size(config: ModelConfig, dtype: torch.dtype, longest_prompt: int, max_new_tokens: int,
                    budget: int, *, prompt_states: bool = True, headroom: float = 0.2, most: int = 1024) -> int:
    """The largest batch (at least 1, at most `most`) whose sequences of `longest_prompt + max_new_tokens`
    tokens fit in (1 - headroom) of `budget` bytes."""
    if longest_prompt < 1 or max_new_tokens < 0 or budget < 0 or not 0 <= headroom < 1:
        raise ValueError(f"auto_batch_size: longest_prompt {longest_prompt} >= 1, max_new_tokens {max_new_tokens} "
                         f">= 0, budget {budget} >= 0 and headroom {headroom} in [0, 1) expected")
    each = bytes_per_sequence(config, dtype, longest_prompt, max_new_tokens, prompt_states)
    return max(1, min(most, int(budget * (1 - headroom)) // each))
