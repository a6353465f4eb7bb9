"""Stand-ins for Bridge recipes (zero-argument functions returning a ConfigContainer-like object)."""

from dataclasses import dataclass, field


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
class FakeConfigContainer:
    model: _Model = field(default_factory=_Model)
    train: _Train = field(default_factory=_Train)


def tiny_sft_config():
    return FakeConfigContainer()


def needs_args_config(size):
    return FakeConfigContainer()


not_a_recipe_config = 42


def returns_dict_config():
    return {"model": 1}
