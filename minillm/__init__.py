"""minillm: a readable Llama/Mistral in PyTorch for studying attention to previous tokens, layer by layer."""

from minillm.api import generate, load
from minillm.config import ModelConfig
from minillm.generate import Sampling, generate_tokens
from minillm.manipulation import KINDS, Manipulation
from minillm.model import KVCache, Transformer

__all__ = ["KINDS", "KVCache", "Manipulation", "ModelConfig", "Sampling", "Transformer", "generate",
           "generate_tokens", "load"]
