"""Megatron-Bridge recipes shipped with otr-megatron (Bridge imported lazily, inside the functions).

`tiny_gpt_cpu_config` is Bridge's own vanilla GPT recipe shrunk to a model that trains in seconds on
a laptop CPU, so a user can try `otr-megatron bridge` without a GPU (CPU mode, `bridge/cpu.py`):

    otr-megatron bridge --recipe otr_megatron.bridge.recipes:tiny_gpt_cpu_config \\
        train.train_iters=4 otr.num_samples=8
"""

from __future__ import annotations

TINY_VOCAB = 256
TINY_SEQ = 64
CPU_FUSIONS_OFF = ("gradient_accumulation_fusion", "masked_softmax_fusion", "bias_activation_fusion",
                   "bias_dropout_fusion", "cross_entropy_loss_fusion", "persist_layer_norm", "apply_rope_fusion")


def make_cpu_ready(cfg) -> None:
    """What a Bridge recipe needs to run on a CPU (gloo, no Transformer Engine, fp32), in place."""
    make_model_cpu_ready(cfg.model)
    cfg.mixed_precision = None
    cfg.optimizer.bf16 = cfg.optimizer.fp16 = False
    cfg.optimizer.use_distributed_optimizer = False
    cfg.ddp.use_distributed_optimizer = False
    cfg.dist.distributed_backend = "gloo"


def make_model_cpu_ready(provider) -> None:
    """The model provider's part: local layer spec (a callable, so a `key=value` override cannot set
    it), every fused kernel off, fp32."""
    import torch
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_impl = "local"
    provider.transformer_layer_spec = local_layer_spec
    for fusion in CPU_FUSIONS_OFF:
        setattr(provider, fusion, False)
    provider.bf16 = provider.fp16 = False
    provider.params_dtype = torch.float32
    provider.pipeline_dtype = None


def short_mock_run(cfg, *, seq_length: int, train_iters: int, global_batch_size: int, micro_batch_size: int) -> None:
    """A short run on Bridge's mock dataset, in place: data in the main process, no warm-up or decay
    horizon beyond the run, no evaluation, no TensorBoard (the CPU recipes' common part)."""
    from megatron.bridge.training.config import MockGPTDatasetConfig

    cfg.model.seq_length = seq_length
    cfg.dataset = MockGPTDatasetConfig(seq_length=seq_length, random_seed=1234, reset_position_ids=False,
                                       reset_attention_mask=False, eod_mask_loss=False, num_workers=0,
                                       dataloader_type="single")
    cfg.train.train_iters = train_iters
    cfg.train.global_batch_size = global_batch_size
    cfg.train.micro_batch_size = micro_batch_size
    cfg.scheduler.lr_warmup_iters = 0
    cfg.scheduler.lr_decay_iters = None
    cfg.validation.eval_interval = None
    cfg.validation.eval_iters = 0
    cfg.logger.tensorboard_dir = None


def tiny_gpt_cpu_config():
    """Bridge's `vanilla_gpt_pretrain_config` at 2 layers, hidden 64, 4 heads, vocab 256, sequence 64.

    Changed from the recipe, each because the CPU (gloo, no Transformer Engine, fp32) needs it
    (`make_cpu_ready`): the local (non-TE) layer spec, which a `key=value` override cannot set
    because it is a callable; every fused kernel off; fp32 params and no mixed precision; no
    distributed optimizer; gloo. Also Bridge's mock dataset in the main process, small batches, no
    warm-up, logging every iteration, no TensorBoard and no checkpoint saving unless
    `checkpoint.save=DIR` is given.
    """
    from megatron.bridge.recipes.gpt import vanilla_gpt_pretrain_config

    cfg = vanilla_gpt_pretrain_config()
    make_cpu_ready(cfg)
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads = 2, 64, 256, 4
    m.vocab_size = TINY_VOCAB
    cfg.tokenizer.vocab_size = TINY_VOCAB
    short_mock_run(cfg, seq_length=TINY_SEQ, train_iters=10, global_batch_size=4, micro_batch_size=2)
    cfg.logger.log_interval = 1
    cfg.checkpoint.save = None
    cfg.checkpoint.save_interval = None
    return cfg
