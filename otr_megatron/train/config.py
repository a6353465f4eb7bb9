"""Configuration of `otr-megatron train`: dataclasses, YAML files and ``key.sub=value`` overrides.

The dataclass defaults *are* the embedded default job (``configs/tiny_cpu.yaml`` is the same values
written out; a test keeps them equal), so the job runs after a plain ``pip install`` without any
file. A YAML file or override only has to name what it changes; an unknown key is an error that
lists the valid keys at that level, so a typo never silently trains the wrong thing.

Data paths of the form ``assets:NAME`` point into the demo dataset shipped inside the package.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

ASSETS_PREFIX = "assets:"
LOSSES = ("otr", "otr-expected", "sft", "dft")
LOSS_TO_ESTIMATOR = {"otr": "sample", "otr-expected": "expected", "sft": "sft", "dft": "dft"}  # core estimator


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


@dataclass
class ModelConfig:
    """A tiny GPT built with megatron-core (the local, Transformer-Engine-free layer spec on CPU)."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    position_embedding_type: str = "rope"  # 'rope' | 'learned_absolute'
    share_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    sequence_parallel: bool = False
    transformer_impl: str = "local"  # 'local' | 'transformer_engine' (GPU only)
    fp8: str | None = None  # None | 'hybrid' | 'e4m3' (Transformer Engine only)
    bf16: bool = False


@dataclass
class DataConfig:
    """SFT splits (local JSONL/Parquet) and how they become ``[b, seq_length]`` rows."""

    tokenizer: str = "byte"  # 'byte' or a local Hugging Face tokenizer directory
    pretrain: list[str] = field(default_factory=lambda: ["assets:pretrain.jsonl"])
    train: list[str] = field(default_factory=lambda: ["assets:train.jsonl"])
    eval: dict[str, list[str]] = field(
        default_factory=lambda: {"in_domain": ["assets:eval_id.jsonl"], "out_of_domain": ["assets:eval_ood.jsonl"]}
    )
    seq_length: int = 64
    pack: bool = True
    packed_attention_mask: bool = True
    on_overflow: str = "truncate"  # 'truncate' | 'error'
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    cache_dir: str | None = None


@dataclass
class OTRConfig:
    """OTR hyper-parameters (paper: K=256 on 7B models; scaled down for the tiny CPU model)."""

    num_samples: int = 32  # K
    temperature: float = 1.3  # kappa
    neg_reward: float = -0.1  # beta: reward of a sampled token that is not the label
    normalization: str = "token"  # 'token' (Megatron global token mean) | 'sequence' (paper)


@dataclass
class OptimConfig:
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_iters: int = 20
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    clip_grad: float = 1.0


@dataclass
class StageConfig:
    """One training stage: `iters` optimizer steps of `loss` at learning rate `lr` (None: optim.lr)."""

    iters: int = 0
    loss: str = "sft"
    lr: float | None = None


@dataclass
class TrainConfig:
    """The whole job. `pretrain` (cross entropy) runs first, then `finetune` with `loss`."""

    seed: int = 1234
    loss: str = "otr"  # the fine-tuning loss: 'otr' | 'otr-expected' | 'sft' | 'dft'
    pretrain_iters: int = 400
    pretrain_lr: float | None = 2.0e-3
    finetune_iters: int = 600
    finetune_lr: float | None = 1.0e-3
    micro_batch_size: int = 8
    global_batch_size: int = 32
    eval_interval: int = 100
    eval_at_start: bool = True
    log_interval: int = 10
    save_interval: int = 0  # 0: only at the end of the job (and at the stage boundary)
    # Divergence guard: after every step the job stops (saving nothing) if the loss, the gradient norm
    # or any parameter is non-finite, or any |parameter| exceeds this bound (.inf: no bound).
    max_param_abs: float = 1.0e6
    stop_at_iteration: int = 0  # >0: save and exit after this iteration, as if interrupted (resume tests)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    output_dir: str = "runs/tiny_cpu"
    resume: bool = False
    progress_bar: bool = True
    plot: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    otr: OTRConfig = field(default_factory=OTRConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def total_iters(self) -> int:
        return self.pretrain_iters + self.finetune_iters

    def stage(self, iteration: int) -> StageConfig:
        """The stage that optimizer step `iteration` (0-based) belongs to."""
        if iteration < self.pretrain_iters:
            return StageConfig(self.pretrain_iters, "sft", self.pretrain_lr)
        return StageConfig(self.finetune_iters, self.loss, self.finetune_lr)

    def validate(self) -> "TrainConfig":
        """Cross-field checks, each error naming the key, its value and what was expected.

        Runs in the launching process before any data, model or worker exists, so a bad value costs
        a second, not a spawned job (and never trains silently: e.g. a learning rate <= 0 or a
        model size of 0 is refused here rather than training by gradient ascent or dividing by 0).
        """
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}; expected one of {LOSSES}")
        for k in ("tp", "pp", "dp", "micro_batch_size", "global_batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)}; expected a positive integer")
        for k in ("pretrain_iters", "finetune_iters", "eval_interval", "log_interval", "save_interval",
                  "stop_at_iteration"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k}={getattr(self, k)}; expected >= 0")
        if self.total_iters < 1:
            raise ConfigError("pretrain_iters + finetune_iters = 0; nothing to train")
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} must be divisible by micro_batch_size x dp = "
                f"{self.micro_batch_size} x {self.dp}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}; expected 'auto', 'cpu' or 'cuda'")
        if not self.output_dir:
            raise ConfigError("output_dir=''; expected a directory path")
        if not (self.max_param_abs > 0):  # also refuses NaN; .inf turns the magnitude bound off
            raise ConfigError(f"max_param_abs={self.max_param_abs}; expected a number > 0 (.inf: no bound)")
        self._validate_lrs()
        self._validate_model()
        d = self.data
        if d.seq_length < 2:
            raise ConfigError(f"data.seq_length={d.seq_length}; expected an integer >= 2")
        if d.on_overflow not in ("truncate", "error"):
            raise ConfigError(f"data.on_overflow={d.on_overflow!r}; expected 'truncate' or 'error'")
        for k in ("pretrain", "train"):
            if not getattr(d, k) and (self.pretrain_iters if k == "pretrain" else self.finetune_iters) > 0:
                raise ConfigError(f"data.{k}=[] but {'pretrain' if k == 'pretrain' else 'finetune'}_iters > 0; "
                                  "expected one or more data files")
        self.core_otr_config()  # the core's own rules for K, kappa, beta, normalization
        return self

    def core_otr_config(self, mode: str | None = None):
        """The core `OTRConfig` of stage `mode` ('pretrain' or a loss; default: the fine-tuning
        loss). Built here too, so the core's validation (one rule, one place) runs before anything
        is launched; its error is re-worded to name the train-config keys (``otr.neg_reward``)."""
        from otr_megatron.core.config import OTRConfig as CoreOTRConfig

        mode = mode or self.loss
        o = self.otr
        kwargs = dict(
            num_samples=o.num_samples,
            temperature=o.temperature,
            neg_reward=o.neg_reward,
            estimator="sft" if mode == "pretrain" else LOSS_TO_ESTIMATOR[mode],
            seed=self.seed,
        )
        if "normalization" in {f.name for f in dataclasses.fields(CoreOTRConfig)}:
            kwargs["normalization"] = "token" if mode == "pretrain" else o.normalization
        elif o.normalization not in ("token", "sequence"):
            raise ConfigError(f"otr.normalization={o.normalization!r}; expected 'token' or 'sequence'")
        try:
            return CoreOTRConfig(**kwargs)
        except ValueError as e:
            raise ConfigError(str(e).replace("OTRConfig.", "otr.", 1)) from None

    def _validate_lrs(self) -> None:
        o = self.optim

        def positive(key, v, allow_none=False, allow_zero=False):
            if v is None and allow_none:
                return
            if v is None or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
                expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
                hint = " (or null: optim.lr)" if allow_none else ""
                raise ConfigError(f"{key}={v}; expected {expected}{hint}")

        positive("optim.lr", o.lr)
        positive("pretrain_lr", self.pretrain_lr, allow_none=True)
        positive("finetune_lr", self.finetune_lr, allow_none=True)
        positive("optim.min_lr", o.min_lr, allow_zero=True)
        positive("optim.weight_decay", o.weight_decay, allow_zero=True)
        positive("optim.clip_grad", o.clip_grad, allow_zero=True)
        if o.warmup_iters < 0:
            raise ConfigError(f"optim.warmup_iters={o.warmup_iters}; expected >= 0")
        for k in ("adam_beta1", "adam_beta2"):
            v = getattr(o, k)
            if not (0 <= v < 1):
                raise ConfigError(f"optim.{k}={v}; expected a number in [0, 1)")

    def _validate_model(self) -> None:
        m = self.model
        for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                  "make_vocab_size_divisible_by"):
            if getattr(m, k) < 1:
                raise ConfigError(f"model.{k}={getattr(m, k)}; expected a positive integer")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
            )
        if m.position_embedding_type not in ("rope", "learned_absolute"):
            raise ConfigError(
                f"model.position_embedding_type={m.position_embedding_type!r}; expected 'rope' or 'learned_absolute'"
            )
        head_dim = m.hidden_size // m.num_attention_heads
        if m.position_embedding_type == "rope" and head_dim % 2:
            raise ConfigError(
                f"model.hidden_size / model.num_attention_heads = {m.hidden_size} / {m.num_attention_heads} = "
                f"{head_dim}: rotary embeddings need an even head dimension"
            )
        if m.num_attention_heads % self.tp:
            raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by tp={self.tp}")
        if m.ffn_hidden_size % self.tp:
            raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by tp={self.tp}")
        if m.num_layers % self.pp:
            raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by pp={self.pp}")
        if m.sequence_parallel and self.data.seq_length % self.tp:
            raise ConfigError(f"data.seq_length={self.data.seq_length} must be divisible by tp={self.tp} with sequence_parallel")
        for k in ("hidden_dropout", "attention_dropout"):
            if not (0 <= getattr(m, k) < 1):
                raise ConfigError(f"model.{k}={getattr(m, k)}; expected a number in [0, 1)")
        if not (math.isfinite(m.init_method_std) and m.init_method_std > 0):
            raise ConfigError(f"model.init_method_std={m.init_method_std}; expected a finite number > 0")
        if m.transformer_impl not in ("local", "transformer_engine"):
            raise ConfigError(f"model.transformer_impl={m.transformer_impl!r}; expected 'local' or 'transformer_engine'")
        if m.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"model.fp8={m.fp8!r}; expected null, 'hybrid' or 'e4m3'")
        if m.fp8 is not None and m.transformer_impl != "transformer_engine":
            raise ConfigError(f"model.fp8={m.fp8!r} needs model.transformer_impl='transformer_engine'")


# ----------------------------------------------------------------------------------------------
# Generic dataclass <-> dict with type checks


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check (and minimally convert: int -> float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r}; expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        if isinstance(value, str):  # a single path given on the command line
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}; expected a list")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}; expected a mapping")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}; expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}; expected a string")
        return value
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, prefix: str = "", base=None):
    """Build (or update a copy of `base`) dataclass `cls` from a nested dict; unknown keys raise."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    obj = dataclasses.replace(base) if base is not None else cls()
    for k, v in data.items():
        if k not in hints:
            raise ConfigError(f"unknown config key {prefix + str(k)!r}; valid keys here: {sorted(hints)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            setattr(obj, k, from_dict(tp, v, prefix=f"{prefix}{k}.", base=getattr(obj, k)))
        else:
            setattr(obj, k, _coerce(v, tp, prefix + k))
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_override(cfg: TrainConfig, text: str) -> TrainConfig:
    """Apply one ``a.b.c=value`` override (value parsed as YAML: 3, 1e-3, true, [a, b], null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    parts = key.split(".")
    nested: dict = {}
    cur = nested
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    # Dicts of lists (data.eval.NAME=path) are replaced per entry, not as a whole.
    if len(parts) == 3 and parts[:2] == ["data", "eval"]:
        new = dict(cfg.data.eval)
        new[parts[2]] = _coerce(value, list[str], key)
        cfg.data.eval = new
        return cfg
    return from_dict(TrainConfig, nested, base=cfg)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then each override, then cross-field validation."""
    cfg = TrainConfig()
    if path:
        try:
            cfg = from_dict(TrainConfig, load_yaml(path), base=cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for o in overrides:
        cfg = apply_override(cfg, o)
    return cfg.validate()


def assets_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "assets")


def resolve_path(p: str) -> str:
    """``assets:NAME`` -> the packaged demo file; other paths are used as given (user-expanded)."""
    if p.startswith(ASSETS_PREFIX):
        return os.path.join(assets_dir(), p[len(ASSETS_PREFIX) :])
    return os.path.expanduser(p)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
