"""Independent float64 full-vocabulary reference for OTR: autograd through log_softmax, no chunking,
no sharding, no shared code with the implementation except the definition of the uniforms."""

import torch

from otr_megatron.core.random import token_uniforms


def ref_loss(logits, labels, estimator, *, temperature=1.3, neg_reward=-0.1, samples=None, vocab_size=None,
             ignore_index=-100):
    """Per-token loss [N] (float64, differentiable w.r.t. `logits` [N, V]).

    samples: [N, K] global ids (estimator "sample").
    """
    x = logits.double()
    if vocab_size is not None and vocab_size < x.size(-1):
        x = x[:, :vocab_size]
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)
    logp = torch.log_softmax(x, -1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    beta = neg_reward
    if estimator == "sft":
        loss = -logp_y
    elif estimator == "dft":
        loss = -logp_y.exp().detach() * logp_y
    elif estimator == "expected":
        q = torch.softmax(x.detach() / temperature, -1)
        q_y = q.gather(1, y[:, None]).squeeze(1)
        loss = -((1 - beta) * q_y * logp_y + beta * (q * logp).sum(-1))
    elif estimator == "sample":
        k = samples.size(1)
        reward = torch.where(samples == y[:, None], 1.0, beta).double()
        loss = -(reward * logp.gather(1, samples)).sum(-1) / k
    else:
        raise ValueError(estimator)
    return torch.where(valid, loss, torch.zeros_like(loss))


def ref_samples(logits, keys, num_samples, temperature, seed, step, vocab_size=None):
    """Single-device inverse-CDF draw in float64 with the same uniforms: [N, K] global ids."""
    x = logits.double()
    if vocab_size is not None:
        x = x[:, :vocab_size]
    cdf = torch.softmax(x / temperature, -1).cumsum(-1)
    u = token_uniforms(keys, num_samples, seed, step) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    return idx.clamp(max=x.size(-1) - 1)


def samples_matrix(owned, n_tok, k):
    """Turn (token index, id) sample lists (any order within a token) into a sorted [N, K] matrix."""
    tok, ids = owned
    order = torch.argsort(tok * (1 << 32) + ids)
    tok, ids = tok[order], ids[order]
    counts = torch.bincount(tok, minlength=n_tok)
    assert bool((counts[counts > 0] == k).all()), f"every sampled token must have exactly K={k} samples"
    out = torch.full((n_tok, k), -1, dtype=torch.int64)
    rows = counts > 0
    out[rows] = ids.view(-1, k)
    return out
