"""A cluster job file (`configs/<model>.yaml`): its typed schema, and the preflight that runs on a laptop.

The most expensive failure of a 70B job comes after the queue wait, when it dies in its first minute.
`plan` and `slurm --config` therefore read the file through `load_cluster_job` (every section typed:
an unknown or mistyped key is one line naming the file, the key and the valid keys; the `otr:` section
through `OTRConfig.from_dict`, as the job reads it) and `preflight` (what Megatron requires of the
layout, and the planner's memory verdict) before anything is written. Where Megatron-Bridge is
installed, `otr_megatron.bridge.preflight` also builds and validates the recipe the job will run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from otr_megatron.config.reader import OverrideError

INT, BOOL, NUMBER, TEXT, TEXT_LIST = "an integer", "true or false", "a number", "a string", "a list of strings"
RECOMPUTE = ("none", "selective", "full")

# section -> key -> expected type (words used in messages) or the tuple of allowed values
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {
        "name": TEXT, "hf_model_id": TEXT, "num_layers": INT, "hidden_size": INT, "ffn_hidden_size": INT,
        "num_attention_heads": INT, "num_query_groups": INT, "vocab_size": INT,
        "make_vocab_size_divisible_by": INT, "untie_embeddings_and_output_weights": BOOL, "add_qkv_bias": BOOL,
        "gated_linear_unit": BOOL, "kv_channels": INT,
    },
    "parallel": {
        "tensor_model_parallel_size": INT, "pipeline_model_parallel_size": INT, "context_parallel_size": INT,
        "virtual_pipeline_model_parallel_size": INT, "sequence_parallel": BOOL, "use_distributed_optimizer": BOOL,
        "account_for_embedding_in_pipeline_split": BOOL, "account_for_loss_in_pipeline_split": BOOL,
    },
    "cluster": {"nodes": INT, "gpus_per_node": INT, "gpu": TEXT, "gpu_memory_gib": NUMBER},
    "train": {
        "seq_length": INT, "micro_batch_size": INT, "global_batch_size": INT, "recompute": RECOMPUTE, "fp8": BOOL,
        "lr": NUMBER, "min_lr": NUMBER, "train_iters": INT,
    },
    "bridge": {"recipe": TEXT, "overrides": TEXT_LIST},
}
# top-level keys of a train job file (configs/tiny_cpu.yaml), for the hint when one is given here
TRAIN_JOB_KEYS = ("seed", "loss", "pretrain_iters", "finetune_iters", "finetune_lr", "data", "tp", "dp", "device")
TOP = {"name": TEXT, "executed": BOOL, "otr": "a mapping of OTR settings", **{s: "a mapping" for s in SCHEMA}}


class JobConfigError(ValueError):
    """A cluster job file (or an override of it) that the job would not run as written."""


def _fits_type(value, kind) -> bool:
    if isinstance(kind, tuple):
        return value in kind
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == TEXT:
        return isinstance(value, str)
    if kind == TEXT_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


def _expected(kind) -> str:
    return "one of " + ", ".join(kind) if isinstance(kind, tuple) else kind


def check_schema(cfg: dict, source: str = "config") -> None:
    """Every key of `cfg` known, every value of its type (null allowed: the default applies), the `otr:`
    section as `OTRConfig.from_dict` reads it. Raises JobConfigError: `source: what; expected/valid`."""
    from otr_megatron.core.config import OTRConfig

    for key, value in cfg.items():
        if key not in TOP:
            hint = ""
            if key in TRAIN_JOB_KEYS:
                hint = (" (this looks like a train job file, read by `otr-megatron train --config`; plan and "
                        "slurm --config read cluster job files such as configs/llama3_8b.yaml)")
            raise JobConfigError(f"{source}: unknown config key {key!r}; valid keys here: {', '.join(TOP)}{hint}")
        if value is None:
            continue
        if key in SCHEMA or key == "otr":
            if not isinstance(value, dict):
                raise JobConfigError(f"{source}: {key}={value!r}; expected {TOP[key]}")
        elif not _fits_type(value, TOP[key]):
            raise JobConfigError(f"{source}: {key}={value!r}; expected {TOP[key]}")
    for section, keys in SCHEMA.items():
        for key, value in (cfg.get(section) or {}).items():
            if key not in keys:
                raise JobConfigError(f"{source}: unknown config key '{section}.{key}'; valid keys here: "
                                     f"{', '.join(keys)}")
            if value is not None and not _fits_type(value, keys[key]):
                raise JobConfigError(f"{source}: {section}.{key}={value!r}; expected {_expected(keys[key])}")
    try:
        OTRConfig.from_dict(cfg.get("otr") or {})
    except (TypeError, ValueError) as exc:  # UnknownOTRKeyError names otr.KEY and the known keys
        raise JobConfigError(f"{source}: otr: {exc}") from None


def apply_overrides(cfg: dict, overrides: typing.Sequence[str], source: str = "config") -> dict:
    """`KEY.SUB=VALUE` words (the shared grammar) set on a copy of `cfg`: any key of the schema, also one
    the file leaves out (`otr.chunk_tokens=4096`); an unknown one names the valid keys."""
    from otr_megatron.config.reader import parse_override
    from otr_megatron.core.config import OTRConfig

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for text in overrides:
        try:
            key, value = parse_override(text)
        except OverrideError as exc:
            raise JobConfigError(f"{source}: {exc}") from None
        section, _, name = key.partition(".")
        if section not in TOP:
            raise JobConfigError(f"{source}: override {text!r}: unknown config key {section!r}; valid keys here: "
                                 f"{', '.join(TOP)}")
        if not name:
            if section in SCHEMA or section == "otr":
                if not isinstance(value, dict):
                    raise JobConfigError(f"{source}: override {text!r}: {section} is a section; set "
                                         f"{section}.KEY=VALUE")
                out[section] = {**(out.get(section) or {}), **value}
            else:
                out[section] = value
            continue
        valid = SCHEMA.get(section) or ({f.name for f in dataclasses.fields(OTRConfig)} if section == "otr" else {})
        if "." in name or name not in valid:
            raise JobConfigError(f"{source}: override {text!r}: unknown config key '{key}'; valid keys here: "
                                 f"{', '.join(sorted(valid) if section == 'otr' else valid)}")
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][name] = value
    return out


@dataclass(frozen=True)
class ClusterJob:
    """A checked job file: `cfg` is what the launcher renders; dims (None without `model:`), layout and
    loss settings are what the planner budgets."""

    source: str
    cfg: dict
    dims: Any
    layout: Any
    loss: Any

    @property
    def name(self) -> str:
        return str(self.cfg.get("name") or (self.dims.name if self.dims else "") or "otr")


def load_cluster_job(path: str, overrides: typing.Sequence[str] = (), *, nodes: int | None = None,
                     gpus_per_node: int | None = None) -> ClusterJob:
    """Read, override, type-check and build the planner's inputs of one job file; `nodes` and
    `gpus_per_node` (the launcher's command line) win over `cluster:`. Every error: JobConfigError."""
    from otr_megatron.config.reader import load_yaml, resolve_interpolations

    try:
        cfg = resolve_interpolations(apply_overrides(load_yaml(path), overrides, path), path)
    except OverrideError as exc:  # the reader's messages name the file already
        raise JobConfigError(str(exc)) from None
    return job_from_dict(cfg, path, nodes=nodes, gpus_per_node=gpus_per_node)


def job_from_dict(cfg: dict, source: str = "config", *, nodes: int | None = None,
                  gpus_per_node: int | None = None) -> ClusterJob:
    """The checks of `load_cluster_job` on an already-parsed mapping (`nodes`, `gpus_per_node` win
    over its `cluster:` section)."""
    from otr_megatron.planning.budget import from_config, layout_from_config, loss_from_config

    counts = {k: v for k, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node)) if v is not None}
    if counts:
        cfg = {**cfg, "cluster": {**(cfg.get("cluster") or {}), **counts}}
    check_schema(cfg, source)
    try:
        if isinstance(cfg.get("model"), dict):
            dims, layout, loss, _ = from_config(cfg)
        else:
            dims, layout, loss = None, layout_from_config(cfg), loss_from_config(cfg)
    except (TypeError, ValueError) as exc:
        raise JobConfigError(f"{source}: {exc}") from None
    return ClusterJob(source=source, cfg=cfg, dims=dims, layout=layout, loss=loss)


# What to change when a term of the per-GPU memory is the largest one.
REMEDIES = {
    "activations": "train.recompute=selective or full, or more context/pipeline parallelism",
    "optimizer": "parallel.use_distributed_optimizer=true, or more data parallelism",
    "grads": "more tensor or pipeline parallelism",
    "weights_bf16": "more tensor or pipeline parallelism",
    "fp8_weight_copies": "more tensor or pipeline parallelism",
    "otr_loss": "a smaller otr.chunk_tokens, or more tensor parallelism (V/tp per rank)",
}


def preflight(job: ClusterJob, *, force: bool = False):
    """What Megatron requires of the layout (`planning.budget.check_layout`, via `plan`) and, with a model, the
    planner's memory verdict: a layout over `cluster.gpu_memory_gib` is refused naming the largest
    term unless `force`. Returns the Budget (None without `model:`); raises JobConfigError."""
    from otr_megatron.planning.budget import GIB, plan

    if job.dims is None:
        try:
            _ = job.layout.num_microbatches  # world size by tp*pp*cp, global batch by micro*dp
        except ValueError as exc:
            raise JobConfigError(f"{job.source}: {exc}") from None
        return None
    try:
        budget = plan(job.dims, job.layout, job.loss, name=job.name)  # plan checks the layout first
    except (TypeError, ValueError) as exc:
        raise JobConfigError(f"{job.source}: {exc}") from None
    if not budget.fits() and not force:
        terms = {k: budget.memory[k] for k in REMEDIES if k in budget.memory}
        terms["otr_loss"] = budget.loss["otr_total"]
        largest = max(terms, key=terms.get)
        raise JobConfigError(
            f"{job.source}: the layout does not fit: {budget.total_otr / GIB:.1f} GiB per GPU with OTR (the "
            f"planner's estimate, worst pipeline stage) > cluster.gpu_memory_gib={job.layout.gpu_memory_gib:g}; "
            f"largest term: {largest} {terms[largest] / GIB:.1f} GiB (try {REMEDIES[largest]}); "
            "--force goes ahead anyway")
    return budget
