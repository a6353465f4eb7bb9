"""Per-GPU memory and per-step communication budget for a Megatron layout.

Estimates, not measurements: they exist so that a layout can be checked for "fits in 80 GB" and
"where does the traffic go" before a job waits in a SLURM queue, and so that the OTR loss memory can
be compared with Megatron's cross entropy on the same logits. Every formula is written out in the
function that computes it; the tests recompute the important ones by hand.

Conventions: bytes; mixed precision with bf16 parameters, fp32 gradients (Megatron's default
`accumulate_allreduce_grads_in_fp32` / Bridge `grad_reduce_in_fp32`), fp32 master weights and two
fp32 Adam moments. Activations are bf16 and assume flash attention (no s^2 score tensor) and no
dropout (Llama/Qwen fine-tuning), so no dropout masks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3


def _int_at_least(name: str, value, lo: int = 1) -> None:
    """An integer (not a bool or float) >= lo; the message names the config key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}; expected an integer >= {lo}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}; expected true or false")


@dataclass(frozen=True)
class ModelDims:
    """Transformer dimensions of a GPT-style decoder (Llama / Qwen family: RMSNorm, SwiGLU, GQA)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    make_vocab_size_divisible_by: int = 128
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False
    gated_linear_unit: bool = True
    kv_channels: int | None = None
    name: str = ""

    def __post_init__(self):
        """Every dimension a positive integer, the heads divisible into query groups: a zero or a
        negative number would divide by zero or budget negative memory."""
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "vocab_size", "make_vocab_size_divisible_by"):
            _int_at_least(f"model.{f}", getattr(self, f))
        if self.kv_channels is not None:
            _int_at_least("model.kv_channels", self.kv_channels)
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                             f"{self.num_attention_heads}; expected a multiple (or set model.kv_channels)")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"model.num_query_groups={self.num_query_groups}; expected a multiple")
        for f in ("untie_embeddings_and_output_weights", "add_qkv_bias", "gated_linear_unit"):
            _flag(f"model.{f}", getattr(self, f))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): query groups x head dim."""
        return self.num_query_groups * self.head_dim

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by * tp`."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def params_per_layer(self) -> int:
        h, f, kv, q = self.hidden_size, self.ffn_hidden_size, self.kv_dim, self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h  # Q, K, V, output projection
        if self.add_qkv_bias:
            attn += q + 2 * kv
        mlp = (3 if self.gated_linear_unit else 2) * h * f
        norms = 2 * h  # RMSNorm weights before attention and MLP
        return attn + mlp + norms

    def embedding_params(self, padded_vocab: int | None = None) -> int:
        """Input embedding plus (if untied) output layer, plus the final norm."""
        v = padded_vocab or self.vocab_size
        return v * self.hidden_size * (2 if self.untie_embeddings_and_output_weights else 1) + self.hidden_size

    def total_params(self, padded_vocab: int | None = None) -> int:
        return self.num_layers * self.params_per_layer() + self.embedding_params(padded_vocab)


@dataclass(frozen=True)
class Layout:
    """Parallel layout and batch shape of one training job."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    # Megatron's uneven pipeline split: the embedding / the loss count as one layer of the first / last
    # stage, so (layers + 1 + 1) must divide by PP x VPP (Bridge's 405B recipes set both)
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    use_distributed_optimizer: bool = True
    nodes: int = 1
    gpus_per_node: int = 8
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 128
    recompute: str = "none"  # none | selective | full
    fp8: bool = False
    grad_bytes: int = 4  # fp32 main grads
    gpu_memory_gib: float = 80.0

    def __post_init__(self):
        """Every count a positive integer (a zero parallel size divides by zero, a negative micro batch
        budgets negative memory), flags booleans, the recompute mode one of three."""
        for attr, key in LAYOUT_KEYS.items():
            value = getattr(self, attr)
            if attr in ("sequence_parallel", "use_distributed_optimizer", "fp8",
                        "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
                _flag(key, value)
            elif attr == "recompute":
                if value not in RECOMPUTE:
                    raise ValueError(f"{key}={value!r}; expected one of {', '.join(RECOMPUTE)}")
            elif attr == "gpu_memory_gib":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                    raise ValueError(f"{key}={value!r}; expected a number of GiB > 0")
            else:
                _int_at_least(key, value)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        denom = self.tp * self.pp * self.cp
        if self.world_size % denom:
            raise ValueError(
                f"world size {self.world_size} ({self.nodes} nodes x {self.gpus_per_node} GPUs) is not divisible by "
                f"tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {denom}"
            )
        return self.world_size // denom

    @property
    def num_microbatches(self) -> int:
        per_step = self.micro_batch_size * self.dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size*dp = "
                f"{self.micro_batch_size}*{self.dp} = {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class LossSettings:
    """What the loss keeps alive on the last pipeline stage (see `loss_memory`)."""

    num_samples: int = 256  # OTR K
    chunk_tokens: int | None = None  # None: the loss's GPU default, 2**24 // (V/tp) tokens per chunk
    chunk_fp32_temporaries: int = 3  # live fp32 [chunk, V/tp] buffers inside one chunk
    stats_per_token: int = 4  # float64 per-token scalars saved for backward (coefficients, shares)
    bytes_per_sample: int = 12  # int64 column + fp32 weight: the fixed-shape [tokens, K] list, on every rank
    fuse_output_layer: bool = False  # otr.fuse_output_layer: logits one chunk at a time (`loss_memory`)
    fused_chunk_tokens: int | None = None  # None: the fused loss's GPU default (torch backend)

    def __post_init__(self):
        _int_at_least("otr.num_samples", self.num_samples)
        if self.chunk_tokens is not None:
            _int_at_least("otr.chunk_tokens", self.chunk_tokens)
        if self.fused_chunk_tokens is not None:
            _int_at_least("otr.fused_chunk_tokens", self.fused_chunk_tokens)
        for f in ("chunk_fp32_temporaries", "stats_per_token", "bytes_per_sample"):
            _int_at_least(f, getattr(self, f), 0)


def bytes_per_param_mixed_precision(dp: int, distributed_optimizer: bool, grad_bytes: int = 4) -> float:
    """bf16 weight (2) + main grad (`grad_bytes`) + fp32 master, Adam m, Adam v (12, sharded over DP)."""
    optimizer = 12.0 / dp if distributed_optimizer else 12.0
    return 2.0 + grad_bytes + optimizer


def activation_bytes_per_layer(dims: ModelDims, layout: Layout) -> float:
    """Saved activations of one transformer layer for one micro-batch (bf16, flash attention).

    Tensors saved for backward, per token: RMSNorm inputs and the GEMM inputs that follow them
    (ln1 in, QKV in, ln2 in, FC1 in: 8h bytes, replicated across TP unless sequence parallel);
    Q (2h), K and V (4*kv), attention output = projection input (2h), FC1 output gate+up (4f),
    FC2 input (2f): sharded by TP. This is the Korthikanti et al. (2022) accounting with SwiGLU,
    GQA and no dropout; it gives about 34*h bytes/token for Llama-3 70B.
    Full recompute keeps only the layer input (2h, SP-sharded when SP is on).
    """
    h, f, kv = dims.hidden_size, dims.ffn_hidden_size, dims.kv_dim
    tokens = layout.seq_length // layout.cp * layout.micro_batch_size
    if layout.recompute == "full":
        per_token = 2 * h / (layout.tp if layout.sequence_parallel else 1)
        return tokens * per_token
    replicated = 8 * h
    sharded = 4 * h + 4 * kv + (6 if dims.gated_linear_unit else 4) * f
    if layout.sequence_parallel:
        per_token = (replicated + sharded) / layout.tp
    else:
        per_token = replicated + sharded / layout.tp
    return tokens * per_token


def layers_on_stage(dims: ModelDims, layout: Layout) -> int:
    return int(math.ceil(dims.num_layers / layout.pp))


def activation_bytes(dims: ModelDims, layout: Layout) -> float:
    """Peak activations on the first pipeline stage under 1F1B.

    Stage 0 holds min(pp, microbatches) micro-batches in flight, each with L/pp layers; interleaving
    multiplies by 1 + (pp-1)/(pp*vpp). Full recompute adds one layer's full activations during the
    recomputation.
    """
    in_flight = min(layout.pp, layout.num_microbatches)
    factor = 1.0
    if layout.vpp > 1 and layout.pp > 1:
        factor = 1.0 + (layout.pp - 1) / (layout.pp * layout.vpp)
    total = activation_bytes_per_layer(dims, layout) * layers_on_stage(dims, layout) * in_flight * factor
    if layout.recompute == "full":
        total += activation_bytes_per_layer(dims, dataclasses.replace(layout, recompute="none"))
    return total


def loss_memory(dims: ModelDims, layout: Layout, loss: LossSettings) -> dict[str, float]:
    """Logits and loss memory on the last stage for one micro-batch.

    logits: [s/cp, b, V/tp] in bf16, the LM-head output (all TP ranks hold the full sequence).
    Megatron CE (`vocab_parallel_cross_entropy`) converts them to fp32 and keeps the fp32 softmax of
    the whole [tokens, V/tp] for backward. OTR (chunked) keeps the bf16 logits, a few scalars per
    token and the fixed-shape [tokens, K] sample list (column and weight; -1 where another rank owns
    the draw: the same shape on every rank, so nothing syncs with the host), and needs
    `chunk_fp32_temporaries` fp32 [chunk, V/tp] buffers plus the forward's float64 block prefix sums
    [tokens, V/tp / B] (B from the real vocabulary and K, docs/sampling.md).
    Fused output layer (`otr.fuse_output_layer`): no [tokens, V/tp] logits; one chunk of them
    (`fused_chunk_tokens` rows, bf16, its gradient written in place), the fp32 temporaries of the
    loss's own chunk inside it and the chunk's block prefix sums, plus the same saved list;
    `otr_total` is then that amount (`otr_unfused_total` stays for comparison).
    """
    tokens = layout.seq_length // layout.cp * layout.micro_batch_size
    v_local = dims.padded_vocab_size(layout.tp) // layout.tp
    logits = 2.0 * tokens * v_local
    ce_saved = 4.0 * tokens * v_local
    from otr_megatron.core.contract import block_size
    from otr_megatron.core.loss import _default_chunk_tokens

    chunk = min(loss.chunk_tokens or _default_chunk_tokens(v_local, on_gpu=True), tokens)
    block = block_size(dims.vocab_size, loss.num_samples, v_local)
    block_table = 8.0 * tokens * (v_local // block)  # float64 prefix sums, forward only
    otr_temporaries = 4.0 * chunk * v_local * loss.chunk_fp32_temporaries + block_table
    otr_saved = tokens * (8.0 * loss.stats_per_token + loss.bytes_per_sample * loss.num_samples)
    from otr_megatron.core.linear_loss import default_linear_chunk, default_loss_chunk

    fchunk = min(loss.fused_chunk_tokens or default_linear_chunk(v_local, on_gpu=True), tokens)
    sub = min(loss.chunk_tokens or default_loss_chunk(v_local, on_gpu=True), fchunk)  # bounds the fp32 temporaries
    fused_chunk = (2.0 * fchunk * v_local + 4.0 * sub * v_local * loss.chunk_fp32_temporaries
                   + 8.0 * fchunk * (v_local // block))
    unfused = logits + otr_saved + otr_temporaries
    return {
        "tokens": float(tokens),
        "vocab_per_rank": float(v_local),
        "logits_bf16": logits,
        "ce_fp32_softmax": ce_saved,
        "ce_total": logits + ce_saved,
        "otr_saved": otr_saved,
        "otr_chunk_temporaries": otr_temporaries,
        "otr_fused_chunk": fused_chunk,
        "otr_unfused_total": unfused,
        "otr_fused_total": otr_saved + fused_chunk,
        "otr_total": otr_saved + fused_chunk if loss.fuse_output_layer else unfused,
    }


def _ring_factor(n: int) -> float:
    """Fraction of a buffer each rank sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n if n > 1 else 0.0


def communication_bytes(dims: ModelDims, layout: Layout) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step, by parallel dimension (ring algorithms).

    TP: per layer and micro-batch, 2 collectives in forward and 2 in backward on a bf16 [s/cp, b, h]
    activation (all-gather + reduce-scatter with SP, all-reduce = 2x without), plus 2 more forward
    collectives per layer under full recompute.
    PP: one bf16 activation [s/cp, b, h] (/tp with SP) sent forward and one gradient backward per
    micro-batch per stage boundary (times vpp with interleaving).
    DP (distributed optimizer): reduce-scatter of the main grads and all-gather of the bf16 params
    over the DP x CP group, once per step; without it, one all-reduce of the grads.
    CP (ring attention): K and V blocks passed around the ring in forward, K, V, dK, dV in backward.
    """
    s_local = layout.seq_length // layout.cp
    b = layout.micro_batch_size
    mb = layout.num_microbatches
    layers = layers_on_stage(dims, layout)
    act = 2.0 * s_local * b * dims.hidden_size  # bf16 activation, full hidden

    tp = 0.0
    if layout.tp > 1:
        per_collective = act * _ring_factor(layout.tp) * (1 if layout.sequence_parallel else 2)
        collectives = 4 + (2 if layout.recompute == "full" else 0)
        tp = per_collective * collectives * layers * mb

    pp = 0.0
    if layout.pp > 1:
        msg = act / (layout.tp if layout.sequence_parallel else 1)
        pp = 2 * msg * mb * max(layout.vpp, 1)

    params_local = dims.total_params(dims.padded_vocab_size(layout.tp)) / (layout.tp * layout.pp)
    dp_group = layout.dp * layout.cp
    dp = 0.0
    if dp_group > 1:
        if layout.use_distributed_optimizer:
            dp = params_local * (layout.grad_bytes + 2) * _ring_factor(dp_group)
        else:
            dp = params_local * layout.grad_bytes * 2 * _ring_factor(dp_group)

    cp = 0.0
    if layout.cp > 1:
        kv_block = 2.0 * s_local * b * dims.kv_dim / layout.tp  # one of K or V, bf16, this TP rank's heads
        fwd = 2 * kv_block * (layout.cp - 1)
        bwd = 4 * kv_block * (layout.cp - 1)
        cp = (fwd + bwd) * layers * mb

    return {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "total": tp + pp + dp + cp}


@dataclass
class Budget:
    """Result of `plan`: per-GPU bytes by category plus per-step communication."""

    name: str
    dims: ModelDims
    layout: Layout
    params_total: int
    params_per_gpu: float
    memory: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=dict)

    @property
    def total_otr(self) -> float:
        return self.memory["total_otr"]

    def fits(self) -> bool:
        return self.memory["total_otr"] <= self.layout.gpu_memory_gib * GIB


def check_layout(dims: ModelDims, layout: Layout) -> None:
    """What Megatron requires of the layout (each number is checked on its own already): TP divides
    the heads and query groups, 2*CP the sequence (CP > 1), TP*PP*CP the world size, micro batch * DP
    the global batch, PP*VPP the layers (VPP only with PP > 1). Raises ValueError naming the keys."""
    if dims.num_attention_heads % layout.tp or dims.num_query_groups % layout.tp:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={layout.tp} must divide model.num_attention_heads="
            f"{dims.num_attention_heads} and model.num_query_groups={dims.num_query_groups}"
        )
    if layout.seq_length % (2 * layout.cp) and layout.cp > 1:
        raise ValueError(f"train.seq_length={layout.seq_length} must be divisible by 2*parallel.context_parallel_size="
                         f"{2 * layout.cp} (each rank holds two chunks of the sequence)")
    _ = layout.num_microbatches  # validates the world size and batch divisibility
    if layout.vpp > 1 and layout.pp == 1:
        raise ValueError(f"parallel.virtual_pipeline_model_parallel_size={layout.vpp} needs "
                         "parallel.pipeline_model_parallel_size > 1 (interleaving splits each pipeline stage); "
                         "expected 1 with pp=1")
    extra = int(layout.account_for_embedding_in_pipeline_split) + int(layout.account_for_loss_in_pipeline_split)
    if (dims.num_layers + extra) % (layout.pp * layout.vpp):
        counted = f"model.num_layers={dims.num_layers}" + (f" + {extra} (embedding/loss counted as layers)"
                                                           if extra else "")
        raise ValueError(f"{counted} must be divisible by parallel.pipeline_model_parallel_size*"
                         f"virtual_pipeline_model_parallel_size={layout.pp}*{layout.vpp} (equal model chunks per "
                         "stage; Megatron's uneven split: parallel.account_for_embedding_in_pipeline_split / "
                         "account_for_loss_in_pipeline_split)")


def plan(dims: ModelDims, layout: Layout, loss: LossSettings | None = None, name: str = "") -> Budget:
    """Memory (per GPU, worst stage) and communication (per GPU per step) for one layout."""
    loss = loss or LossSettings()
    check_layout(dims, layout)
    padded = dims.padded_vocab_size(layout.tp)
    # Worst stage: layers plus the larger of embedding (first stage) and output layer (last stage);
    # with pp == 1 both live on the one stage.
    layer_params = layers_on_stage(dims, layout) * dims.params_per_layer()
    emb = padded * dims.hidden_size
    if layout.pp == 1:
        stage_params = layer_params + dims.embedding_params(padded)
    else:
        stage_params = layer_params + emb + dims.hidden_size
    params_per_gpu = stage_params / layout.tp
    dp_shard = layout.dp * layout.cp  # the distributed optimizer shards over DP x CP
    mem = {
        "weights_bf16": 2.0 * params_per_gpu,
        "grads": float(layout.grad_bytes) * params_per_gpu,
        "optimizer": 12.0 * params_per_gpu / (dp_shard if layout.use_distributed_optimizer else 1),
        "activations": activation_bytes(dims, layout),
    }
    if layout.fp8:
        # FP8 GEMMs keep a transposed fp8 copy of each weight for the backward pass (1 byte/param).
        mem["fp8_weight_copies"] = 1.0 * params_per_gpu
    loss_mem = loss_memory(dims, layout, loss)
    base = sum(mem.values())
    mem["total_ce"] = base + loss_mem["ce_total"]
    mem["total_otr"] = base + loss_mem["otr_total"]
    return Budget(
        name=name or dims.name,
        dims=dims,
        layout=layout,
        params_total=dims.total_params(),
        params_per_gpu=params_per_gpu,
        memory=mem,
        loss=loss_mem,
        comm=communication_bytes(dims, layout),
    )


_MODEL_KEYS = {f for f in ModelDims.__dataclass_fields__}
_PARALLEL_KEYS = {
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "context_parallel_size": "cp",
    "virtual_pipeline_model_parallel_size": "vpp",
    "sequence_parallel": "sequence_parallel",
    "account_for_embedding_in_pipeline_split": "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split": "account_for_loss_in_pipeline_split",
    "use_distributed_optimizer": "use_distributed_optimizer",
}
_CLUSTER_KEYS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "gpu_memory_gib": "gpu_memory_gib"}
_TRAIN_KEYS = {
    "seq_length": "seq_length",
    "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size",
    "recompute": "recompute",
    "fp8": "fp8",
}
RECOMPUTE = ("none", "selective", "full")
# Layout field -> the config key it comes from (error messages name the key the user typed).
LAYOUT_KEYS = {attr: f"{section}.{key}" for section, keys in
               (("parallel", _PARALLEL_KEYS), ("cluster", _CLUSTER_KEYS), ("train", _TRAIN_KEYS))
               for key, attr in keys.items()}
LAYOUT_KEYS["grad_bytes"] = "grad_bytes"


def from_config(cfg: dict[str, Any]) -> tuple[ModelDims, Layout, LossSettings, str]:
    """Build the calculator inputs from a parsed `configs/*.yaml` (sections model/parallel/cluster/train/otr).

    Every number is checked here (ModelDims, Layout, LossSettings) and the `otr:` section through
    `OTRConfig.from_dict`, the same check the job applies: a ValueError names the key and the value."""
    for section in ("model", "parallel", "cluster", "train"):
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"config needs a mapping section {section!r}; found {type(cfg.get(section)).__name__}")
    model = {k: v for k, v in cfg["model"].items() if k in _MODEL_KEYS}
    missing = sorted(f.name for f in dataclasses.fields(ModelDims)
                     if f.default is dataclasses.MISSING and f.name not in model)
    if missing:
        raise ValueError(f"model: missing {', '.join('model.' + m for m in missing)}; expected positive integers")
    dims = ModelDims(**model)
    return dims, layout_from_config(cfg), loss_from_config(cfg), str(cfg.get("name", dims.name))


def layout_from_config(cfg: dict[str, Any]) -> Layout:
    """The `parallel:`, `cluster:` and `train:` numbers of a parsed config as a checked Layout."""
    return Layout(**_layout_values(cfg))


def loss_from_config(cfg: dict[str, Any]) -> LossSettings:
    """What the loss keeps alive, from the `otr:` section as the job reads it."""
    otr = check_otr(cfg)
    return LossSettings(num_samples=otr.num_samples, chunk_tokens=otr.chunk_tokens,
                        fuse_output_layer=otr.fuse_output_layer, fused_chunk_tokens=otr.fused_chunk_tokens)


def _layout_values(cfg: dict[str, Any]) -> dict[str, Any]:
    lay: dict[str, Any] = {}
    for section, keys in (("parallel", _PARALLEL_KEYS), ("cluster", _CLUSTER_KEYS), ("train", _TRAIN_KEYS)):
        part = cfg.get(section) or {}
        if not isinstance(part, dict):
            raise ValueError(f"{section}={part!r}; expected a mapping section")
        for key, attr in keys.items():
            if key in part and part[key] is not None:
                lay[attr] = part[key]
    return lay


def check_otr(cfg: dict[str, Any]):
    """The `otr:` section as the job will read it (`OTRConfig.from_dict`: unknown keys, K >= 1, kappa > 0, ...)."""
    from otr_megatron.core.config import OTRConfig

    otr = cfg.get("otr")
    if otr is None:
        otr = {}
    if not isinstance(otr, dict):
        raise ValueError(f"otr={otr!r}; expected a mapping of OTR settings")
    try:
        return OTRConfig.from_dict(otr)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"otr: {exc}") from None


def check_config(cfg: dict[str, Any], nodes: int | None = None, gpus_per_node: int | None = None) -> None:
    """Everything `otr-megatron slurm --config` writes into a job, checked before a file is written (the
    schema, the `otr:` section, every layout number with the command line's node and GPU counts, and,
    with a `model:` section, what the layout needs of the model); the memory verdict is not part of it
    (`otr_megatron.config.cluster_job.preflight`). Raises ValueError naming the key and the value."""
    from otr_megatron.config.cluster_job import job_from_dict, preflight

    preflight(job_from_dict(cfg, nodes=nodes, gpus_per_node=gpus_per_node), force=True)
