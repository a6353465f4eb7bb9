"""A tiny NeMo 2.x recipe that trains on a laptop CPU, built only from NeMo's own pieces.

    from otr_megatron.nemo import otr_recipe
    from otr_megatron.nemo.recipes import tiny_gpt_cpu_recipe
    recipe = otr_recipe(tiny_gpt_cpu_recipe(max_steps=4), num_samples=8)
    import nemo_run as run; run.run(recipe, direct=True)     # or fiddle.build(recipe)()

`llm.pretrain` with `llm.GPTModel(llm.GPTConfig)` at 2 layers / hidden 64, `MockDataModule` over a
`NullTokenizer` (no download), `MegatronStrategy(process_group_backend="gloo")` and
`Trainer(accelerator="cpu")`. Call `otr_megatron.nemo.cpu.enable_cpu_mode()` before running it on a
machine without a GPU (`otr-megatron nemo` does both).
"""

from __future__ import annotations

from typing import Optional

# The CPU path has no fused kernels (they need CUDA or Transformer Engine) and no mixed precision.
_CPU_MODEL_SETTINGS = dict(
    gradient_accumulation_fusion=False, masked_softmax_fusion=False, cross_entropy_loss_fusion=False,
    bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    persist_layer_norm=False, use_cpu_initialization=True, bf16=False, fp16=False,
)


def tiny_gpt_cpu_recipe(*, max_steps: int = 4, devices: int = 1, tensor_model_parallel_size: int = 1,
                        seq_length: int = 32, vocab_size: int = 256, num_layers: int = 2, hidden_size: int = 64,
                        num_attention_heads: int = 4, micro_batch_size: int = 2, global_batch_size: int = 4,
                        lr: float = 1e-3, log_dir: Optional[str] = None):
    """`run.Partial(llm.pretrain, ...)` of a tiny GPT on mock data, ready for `otr_recipe`.

    devices: processes on this machine (TP x DP); vocab_size: the real vocabulary (NullTokenizer,
    the model pads it to a multiple of 128 x TP). log_dir: NeMo's experiment directory (default
    ./nemo_experiments), with TensorBoard logs under tb_logs/. No checkpoint is written.
    """
    if devices % tensor_model_parallel_size:
        raise ValueError(f"devices={devices} is not a multiple of tensor_model_parallel_size="
                         f"{tensor_model_parallel_size}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size}: expected >= 2")
    import nemo_run as run
    from lightning.pytorch.loggers import TensorBoardLogger
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.collections.common.tokenizers.null_tokenizer import NullTokenizer
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    tokenizer = run.Config(NullTokenizer, vocab_size=vocab_size - 1)  # NullTokenizer adds one EOD id
    config = run.Config(
        llm.GPTConfig, num_layers=num_layers, hidden_size=hidden_size, ffn_hidden_size=4 * hidden_size,
        num_attention_heads=num_attention_heads, seq_length=seq_length, transformer_layer_spec=local_layer_spec,
        **_CPU_MODEL_SETTINGS)
    optim = run.Config(nl.MegatronOptimizerModule, config=run.Config(
        OptimizerConfig, optimizer="adam", lr=lr, use_distributed_optimizer=False, bf16=False, fp16=False,
        clip_grad=1.0))
    strategy = run.Config(
        nl.MegatronStrategy, tensor_model_parallel_size=tensor_model_parallel_size, process_group_backend="gloo",
        ckpt_async_save=False, ddp=run.Config(DistributedDataParallelConfig, grad_reduce_in_fp32=True,
                                              overlap_grad_reduce=False, use_distributed_optimizer=False))
    trainer = run.Config(
        nl.Trainer, accelerator="cpu", devices=devices, max_steps=max_steps, strategy=strategy,
        log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
        enable_progress_bar=False)
    data = run.Config(llm.MockDataModule, seq_length=seq_length, tokenizer=tokenizer,
                      micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, num_workers=0,
                      pin_memory=False, create_attention_mask=True,
                      num_train_samples=max_steps * global_batch_size, num_val_samples=global_batch_size,
                      num_test_samples=global_batch_size)
    return run.Partial(
        llm.pretrain, model=run.Config(llm.GPTModel, config=config, tokenizer=tokenizer), data=data,
        trainer=trainer, optim=optim,
        log=run.Config(nl.NeMoLogger, name="tiny_gpt_cpu", log_dir=log_dir, ckpt=None,
                       tensorboard=run.Config(TensorBoardLogger, save_dir="tb_logs", name="tiny_gpt_cpu")))
