"""Megatron-Bridge recipes shipped with otr-megatron (Bridge imported lazily, inside the functions).

`tiny_gpt_cpu_config` is Bridge's own vanilla GPT recipe shrunk to a model that trains in seconds on
a laptop CPU, so a user can try `otr-megatron bridge` without a GPU (CPU mode, `bridge/cpu.py`):

    otr-megatron bridge --recipe otr_megatron.bridge.recipes:tiny_gpt_cpu_config \\
        train.train_iters=4 otr.num_samples=8
"""

from __future__ import annotations

TINY_VOCAB = 256
TINY_SEQ = 64


def tiny_gpt_cpu_config():
    """Bridge's `vanilla_gpt_pretrain_config` at 2 layers, hidden 64, 4 heads, vocab 256, sequence 64.

    Changed from the recipe, each because the CPU (gloo, no Transformer Engine, fp32) needs it
    (`hf.make_cpu_ready`): the local (non-TE) layer spec, which a `key=value` override cannot set
    because it is a callable; every fused kernel off; fp32 params and no mixed precision; no
    distributed optimizer; gloo. Also Bridge's mock dataset in the main process, small batches, no
    warm-up, logging every iteration, no TensorBoard and no checkpoint saving unless
    `checkpoint.save=DIR` is given.
    """
    from megatron.bridge.recipes.gpt import vanilla_gpt_pretrain_config
    from megatron.bridge.training.config import MockGPTDatasetConfig

    from otr_megatron.bridge.hf import make_cpu_ready

    cfg = vanilla_gpt_pretrain_config()
    make_cpu_ready(cfg)
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads = 2, 64, 256, 4
    m.seq_length = TINY_SEQ
    m.vocab_size = TINY_VOCAB

    cfg.tokenizer.vocab_size = TINY_VOCAB
    cfg.dataset = MockGPTDatasetConfig(seq_length=TINY_SEQ, random_seed=1234, reset_position_ids=False,
                                       reset_attention_mask=False, eod_mask_loss=False, num_workers=0,
                                       dataloader_type="single")

    cfg.train.train_iters = 10
    cfg.train.global_batch_size = 4
    cfg.train.micro_batch_size = 2
    cfg.scheduler.lr_warmup_iters = 0
    cfg.scheduler.lr_decay_iters = None
    cfg.validation.eval_interval = None
    cfg.validation.eval_iters = 0
    cfg.logger.log_interval = 1
    cfg.logger.tensorboard_dir = None
    cfg.checkpoint.save = None
    cfg.checkpoint.save_interval = None
    return cfg
