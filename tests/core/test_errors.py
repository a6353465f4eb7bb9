"""Bad input raises a clear error naming the argument; it never trains on wrong numbers."""

import math

import pytest
import torch

import otr_megatron as otr

X = torch.randn(4, 16)
Y = torch.tensor([1, 2, 3, -100])
CFG = otr.OTRConfig(num_samples=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=2.0), "num_samples"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(neg_reward=1.0), "neg_reward"),
        (dict(neg_reward=math.nan), "neg_reward"),
        (dict(neg_reward=-math.inf), "neg_reward"),
        (dict(estimator="ppo"), "estimator"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        otr.OTRConfig(**kwargs)


def test_config_from_dict_names_unknown_keys():
    with pytest.raises(KeyError, match="num_sample"):
        otr.OTRConfig.from_dict({"num_sample": 3})
    assert otr.OTRConfig.from_dict({"num_samples": 3}).num_samples == 3


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: otr.vocab_parallel_otr_loss(X, torch.tensor([1, 2, 16, 0]), CFG), ValueError, r"labels.*\[0, vocab_size=16\)"),
        (lambda: otr.vocab_parallel_otr_loss(X, torch.tensor([1, 2, -1, 0]), CFG), ValueError, "ignore_index=-100"),
        (lambda: otr.vocab_parallel_otr_loss(X, torch.tensor([1, 2, 12, 0]), CFG, vocab_size=10), ValueError, "vocab_size=10"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y[:3], CFG), ValueError, "labels shape"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y.float(), CFG), TypeError, "labels must be an int64"),
        (lambda: otr.vocab_parallel_otr_loss(X.long(), Y, CFG), TypeError, "logits must be"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, vocab_size=17), ValueError, "vocab_size"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, vocab_size=0), ValueError, "vocab_size"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, padded_vocab_size=32), ValueError, "padded_vocab_size=32"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, token_keys=torch.arange(3)), ValueError, "token_keys shape"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, token_keys=torch.ones(4)), TypeError, "token_keys"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, step=-1), ValueError, "step"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, {"num_samples": 4}), TypeError, "OTRConfig"),
        (lambda: otr.vocab_parallel_otr_loss(X, Y, CFG, ignore_index=1), ValueError, "ignore_index=1"),
    ],
)
def test_loss_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_in_place_change_of_logits_before_backward_is_detected():
    x = X.clone().requires_grad_()
    logits = x * 1.0
    loss = otr.vocab_parallel_otr_loss(logits, Y, CFG)
    logits.add_(1.0)  # someone modifies the saved logits
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
