"""A `configs/*.yaml` job as the `otr-megatron bridge` command that runs it.

The file states the layout once: `parallel:` (TP/PP/CP/VP, sequence parallelism, distributed
optimizer), `train:` (sequence length, batch sizes, recompute, FP8, learning rate, iterations) and
`otr:`. `otr-megatron plan` reads those sections, and the Bridge command line is derived from the
same sections here, so the layout that was planned is the layout that runs. `bridge.recipe` names
the recipe; `bridge.overrides` may add Bridge `KEY=VALUE` words for anything else (data paths,
checkpoints), but not a key derived here.
"""

from __future__ import annotations

from typing import Any

# Bridge override -> (section, key) of the config file it comes from.
DERIVED: dict[str, tuple[str, str]] = {
    "model.tensor_model_parallel_size": ("parallel", "tensor_model_parallel_size"),
    "model.pipeline_model_parallel_size": ("parallel", "pipeline_model_parallel_size"),
    "model.context_parallel_size": ("parallel", "context_parallel_size"),
    "model.virtual_pipeline_model_parallel_size": ("parallel", "virtual_pipeline_model_parallel_size"),
    "model.sequence_parallel": ("parallel", "sequence_parallel"),
    "model.account_for_embedding_in_pipeline_split": ("parallel", "account_for_embedding_in_pipeline_split"),
    "model.account_for_loss_in_pipeline_split": ("parallel", "account_for_loss_in_pipeline_split"),
    "ddp.use_distributed_optimizer": ("parallel", "use_distributed_optimizer"),
    "optimizer.use_distributed_optimizer": ("parallel", "use_distributed_optimizer"),
    "model.seq_length": ("train", "seq_length"),
    "dataset.seq_length": ("train", "seq_length"),  # Bridge asserts model and dataset agree
    "train.micro_batch_size": ("train", "micro_batch_size"),
    "train.global_batch_size": ("train", "global_batch_size"),
    "train.train_iters": ("train", "train_iters"),
    "optimizer.lr": ("train", "lr"),
    "optimizer.min_lr": ("train", "min_lr"),
    "model.recompute_granularity": ("train", "recompute"),
    "model.fp8": ("train", "fp8"),
}
# Set on every OTR job: Megatron's global token mean over the micro-batches (the per-token OTR loss).
FIXED = {"model.calculate_per_token_loss": True}
# What the planner's `recompute: full` assumes: every layer recomputed from its input.
FULL_RECOMPUTE = {"model.recompute_method": "uniform", "model.recompute_num_layers": 1}


class BridgeJobError(ValueError):
    """A config file cannot be turned into a Bridge command line."""


def _word(key: str, value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}"


def bridge_overrides(cfg: dict) -> dict[str, Any]:
    """The Bridge overrides stated by the file's `parallel:` and `train:` sections (plus `FIXED`)."""
    out: dict[str, Any] = {}
    for key, (section, name) in DERIVED.items():
        part = cfg.get(section)
        if not isinstance(part, dict) or name not in part:
            continue
        value = part[name]
        if key == "model.virtual_pipeline_model_parallel_size" and value == 1:
            value = None  # Megatron: None = no interleaving (1 would select the interleaved schedule)
        elif key == "model.recompute_granularity":
            if value not in ("none", "selective", "full"):
                raise BridgeJobError(f"train.recompute={value!r}; expected none, selective or full")
            if value == "full":
                out.update(FULL_RECOMPUTE)
            value = None if value == "none" else value
        elif key == "model.fp8":
            if not isinstance(value, bool):
                raise BridgeJobError(f"train.fp8={value!r}; expected true or false")
            value = "hybrid" if value else None  # e4m3 forward, e5m2 gradients: Transformer Engine's usual recipe
        out[key] = value
    out.update(FIXED)
    return out


def bridge_command(cfg: dict, program: str = "otr-megatron") -> list[str]:
    """`otr-megatron bridge --recipe R <derived overrides> <bridge.overrides> otr.KEY=VALUE ...`."""
    bridge = cfg.get("bridge")
    if not isinstance(bridge, dict) or not isinstance(bridge.get("recipe"), str) or not bridge["recipe"]:
        raise BridgeJobError("the config has no `bridge.recipe` (module:function of a Megatron-Bridge recipe); "
                             "give the command after `--` instead")
    derived = bridge_overrides(cfg)
    extra = bridge.get("overrides") or []
    if not isinstance(extra, list) or not all(isinstance(w, str) and "=" in w for w in extra):
        raise BridgeJobError(f"bridge.overrides={extra!r}; expected a list of Bridge KEY=VALUE words")
    for word in extra:
        key = word.split("=", 1)[0].strip()
        if key in derived:
            src = ".".join(DERIVED[key]) if key in DERIVED else "every OTR job"
            raise BridgeJobError(f"bridge.overrides sets {key}, which comes from {src}; change it there "
                                 "so the planner and the job see the same value")
    otr = cfg.get("otr") or {}
    if not isinstance(otr, dict):
        raise BridgeJobError(f"otr={otr!r}; expected a mapping of OTR settings")
    return [program, "bridge", "--recipe", bridge["recipe"], *(_word(k, v) for k, v in derived.items()),
            *extra, *(_word(f"otr.{k}", v) for k, v in otr.items())]
