"""Stand-ins for Bridge recipes (zero-argument functions returning a ConfigContainer-like object)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class _Model:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    vocab_size: int = 256


@dataclass
class _Train:
    global_batch_size: int = 8
    micro_batch_size: int = 1


@dataclass
class _Checkpoint:
    pretrained_checkpoint: Optional[str] = None
    load: Optional[str] = None


@dataclass
class _Tokenizer:
    tokenizer_model: Optional[str] = None


@dataclass
class FakeConfigContainer:
    model: _Model = field(default_factory=_Model)
    train: _Train = field(default_factory=_Train)
    checkpoint: _Checkpoint = field(default_factory=_Checkpoint)
    tokenizer: _Tokenizer = field(default_factory=_Tokenizer)


def tiny_sft_config():
    return FakeConfigContainer()


def needs_args_config(size):
    return FakeConfigContainer()


not_a_recipe_config = 42


def returns_dict_config():
    return {"model": 1}


def offline_hub_config():
    """What Bridge's Llama recipes raise offline (safe_load_config_with_retry wraps transformers' OSError)."""
    try:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    except OSError as exc:
        raise ValueError("Failed to load configuration from meta-llama/Llama-3.2-1B after 4 attempts") from exc


def broken_config():
    raise ValueError("a recipe bug unrelated to the hub")
