"""Simulated tensor parallelism in one process: the loss's own steps run for every rank of a layout,
with the all-gather replaced by a stack (what `all_gather_into_tensor` produces). Lets the
layout-exactness of the sampler be checked on a million samples in seconds; the real multi-process
check (gloo, megatron-core parallel_state) is tests/core/test_tensor_parallel.py."""

import torch

from otr_megatron.core.backends import get_backend
from otr_megatron.core.loss import draw_samples, global_normalisers, label_columns, local_statistics, make_spec
from otr_megatron.core.random import stream_key


def simulated_draw(x, labels, cfg, tp, *, step=0, keys=None, vocab_size=None, chunk=None, ignore_index=-100):
    """[N, K] global ids drawn by a simulated TP layout on full logits ``x [N, V_pad]`` (sample j of
    token t at [t, j], -1 where no rank drew: ignored or non-finite tokens)."""
    n_tok, padded = x.shape
    shard = padded // tp
    vocab_size = vocab_size or padded
    keys = torch.arange(n_tok) if keys is None else keys
    backend = get_backend("torch", x.device)
    ranks = []
    for r in range(tp):
        spec = make_spec(cfg, r, tp, shard, vocab_size)
        part = x[:, r * shard : (r + 1) * shard].contiguous()
        valid, owns, col = label_columns(labels, spec, ignore_index)
        stats, prefix = local_statistics(backend, spec, part, col, owns, chunk or n_tok)
        ranks.append((spec, part, valid, owns, col, stats, prefix))
    allstats = torch.stack([r[5] for r in ranks])  # what the all-gather returns: [tp, N, C]
    drawn = torch.full((n_tok, cfg.num_samples), -1, dtype=torch.int64)
    for spec, part, valid, owns, col, _, prefix in ranks:
        norms = global_normalisers(allstats, spec, valid)
        _, cols, _ = draw_samples(backend, spec, part, keys, col, owns, norms, prefix, stream_key(cfg.seed, step))
        mine = cols >= 0
        assert not bool((mine & (drawn >= 0)).any()), "a sample was drawn by two ranks"
        drawn = torch.where(mine, cols + spec.rank * shard, drawn)
    return drawn
