"""A small Megatron-Core GPTModel builder for tests, the CPU demo job and scaled runs.

It builds a stock `megatron.core.models.gpt.GPTModel` (never a fork) from a flat config:
the local layer spec (pure torch, runs on CPU; `SPTorchNorm` so sequence parallelism works), or
the Transformer Engine spec when `use_te=True` and TE imports. The parallel layout comes from
`megatron.core.parallel_state`, which must be initialized first.

`layout_invariant_init_` re-initializes the parameters from their *global* checkpoint identity
(sharded-state-dict key, global shape and offset), so any TP/PP/VP layout holds exactly the slice of
the same global weights. That makes "same numbers in every layout" a direct test.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch


@dataclass
class GPTBuildConfig:
    """What the builder needs; the parallel sizes must match `parallel_state`."""

    vocab_size: int = 256  # real (unpadded) vocabulary; the model is padded above it
    seq_length: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 8
    position_embedding_type: str = "learned_absolute"  # or "rope"
    normalization: str = "LayerNorm"
    share_embeddings_and_output_weights: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    mtp_num_layers: Optional[int] = None
    params_dtype: str = "float32"  # "float32" | "bfloat16"
    use_te: bool = False
    fp8: Optional[str] = None  # "hybrid" | "e4m3" (TE only)
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise" (current scaling)
    recompute_granularity: Optional[str] = None  # None | "full" | "selective"
    recompute_num_layers: Optional[int] = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    calculate_per_token_loss: bool = True
    init_method_std: float = 0.02
    extra: dict = field(default_factory=dict)  # passed through to TransformerConfig

    @classmethod
    def from_any(cls, cfg: Any) -> "GPTBuildConfig":
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(cfg) - names)
            if unknown:
                raise ValueError(f"GPTBuildConfig: unknown keys {unknown}; expected some of {sorted(names)}")
            return cls(**cfg)
        if dataclasses.is_dataclass(cfg):
            return cls.from_any({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                 if f.name in {g.name for g in dataclasses.fields(cls)}})
        raise TypeError(f"cfg: expected a GPTBuildConfig, dict or dataclass, got {type(cfg).__name__}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return ((self.vocab_size + m - 1) // m) * m


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_transformer_config(cfg: Any):
    """TransformerConfig for `cfg`; CPU-safe settings (no fused kernels) when TE is not used."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = GPTBuildConfig.from_any(cfg)
    if cfg.params_dtype not in _DTYPES:
        raise ValueError(f"params_dtype={cfg.params_dtype!r}: expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    kw = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
        # The local attention cannot run CP; with the TE spec the config carries the real size.
        context_parallel_size=cfg.context_parallel_size if cfg.use_te else 1,
        mtp_num_layers=cfg.mtp_num_layers,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        calculate_per_token_loss=cfg.calculate_per_token_loss,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        cross_entropy_loss_fusion=False,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=(cfg.recompute_num_layers or 1) if cfg.recompute_granularity == "full" else None,
    )
    if cfg.mtp_num_layers:
        # megatron-core 0.15 defaults this to None, which GPTModel then divides by the MTP depth;
        # 0.1 is the default from 0.16 on
        kw["mtp_loss_scaling_factor"] = 0.1
    if cfg.fp8:
        if not cfg.use_te:
            raise ValueError(f"fp8={cfg.fp8!r} needs use_te=True (FP8 runs through Transformer Engine)")
        kw.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    kw.update(cfg.extra)
    return TransformerConfig(**kw)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError/RuntimeError from a broken CUDA install
        return False
    return True


def build_layer_spec(cfg: Any):
    """Local spec with `SPTorchNorm`, or the TE spec when `cfg.use_te` (error if TE is missing)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from otr_megatron.mcore.cpu_backend import SPTorchNorm

    cfg = GPTBuildConfig.from_any(cfg)
    if cfg.use_te:
        if not te_available():
            raise RuntimeError("use_te=True but transformer_engine.pytorch cannot be imported")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            normalization=cfg.normalization
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.normalization)
    spec.submodules.input_layernorm = SPTorchNorm
    spec.submodules.pre_mlp_layernorm = SPTorchNorm
    return spec


def build_gpt_model(cfg: Any, pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    vp_stage: Optional[int] = None, config=None):
    """One GPTModel chunk for this rank's pipeline stage (and virtual stage `vp_stage`).

    `pre_process`/`post_process` default to this rank being the first/last (virtual) stage. The
    model carries the real vocabulary size as `model.otr_real_vocab_size` so `enable_otr` picks
    it up without being told.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    cfg = GPTBuildConfig.from_any(cfg)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size):
        raise ValueError(
            f"cfg has tensor/pipeline sizes ({cfg.tensor_model_parallel_size}, "
            f"{cfg.pipeline_model_parallel_size}) but parallel_state was initialized with ({tp}, {pp})"
        )
    config = config or make_transformer_config(cfg)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)

    layer_spec = build_layer_spec(cfg)
    if cfg.use_te:
        spec = layer_spec
    else:
        # A block spec so the final norm is SPTorchNorm too (the layer-spec path picks apex/torch).
        from otr_megatron.mcore.cpu_backend import SPTorchNorm

        n = get_num_layers_to_build(config, vp_stage=vp_stage)
        spec = TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=SPTorchNorm)
    kwargs = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        vp_stage=vp_stage,
    )
    if cfg.mtp_num_layers:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        kwargs["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config, layer_spec, use_transformer_engine=cfg.use_te, vp_stage=vp_stage
        )
    model = GPTModel(**kwargs)
    model.otr_real_vocab_size = cfg.vocab_size
    return model


def build_model_chunks(cfg: Any):
    """All model chunks of this rank: one, or `virtual_pipeline_model_parallel_size` (interleaved)."""
    cfg = GPTBuildConfig.from_any(cfg)
    config = make_transformer_config(cfg)
    vp = cfg.virtual_pipeline_model_parallel_size
    if vp is None:
        return [build_gpt_model(cfg, config=config)]
    return [build_gpt_model(cfg, vp_stage=i, config=config) for i in range(vp)]


def _global_tensor(key: str, shape, seed: int, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(key.encode())) % (2**63))
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    if "norm" in key and key.endswith("weight"):
        return 1.0 + 0.1 * t
    if key.endswith("bias"):
        return 0.01 * t
    return std * t


@torch.no_grad()
def layout_invariant_init_(model_chunks, seed: int = 1234, std: float = 0.02) -> int:
    """Set every parameter to its slice of a global tensor drawn from (seed, checkpoint key).

    Returns the number of tensors written. Identical global weights in every TP/PP/VP layout.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from otr_megatron.mcore.hook import unwrap_model

    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    n = 0
    for chunk in model_chunks:
        m = unwrap_model(chunk)
        sd = m.sharded_state_dict()
        for name, st in sd.items():
            if not isinstance(st, ShardedTensor):
                if "_extra_state" in name:
                    continue
                raise TypeError(f"layout_invariant_init_: {name} is a {type(st).__name__}; only plain "
                                "ShardedTensors are supported (avoid gated MLPs with TP)")
            if st.flattened_range is not None:
                raise TypeError(f"layout_invariant_init_: {name} is flattened (distributed optimizer state)")
            full = _global_tensor(st.key, st.global_shape, seed, std)
            pre = st.prepend_axis_num
            idx = []
            for d, off in enumerate(st.global_offset):
                length = 1 if d < pre else st.local_shape[d - pre]
                idx.append(slice(off, off + length))
            st.data.copy_(full[tuple(idx)].reshape(st.data.shape).to(st.data.dtype))
            n += 1
    return n
