"""Configuration of `otr-megatron train`: typed dataclasses, YAML files and ``key.sub=value`` overrides.

The dataclass defaults *are* the embedded default job (``configs/tiny_cpu.yaml`` is the same values
written out; a test keeps them equal), so the job runs after a plain ``pip install`` without any
file. OmegaConf builds the typed schema from the dataclasses and applies the file and the overrides
(the grammar of `otr_megatron.cli`, shared with `plan` and `slurm`); an unknown key is an error
that lists the valid keys at that level, so a typo never silently trains the wrong thing.

`otr:` is the core `OTRConfig` itself, every field settable, except two that the job owns: the
estimator comes from `loss` (and is cross entropy in the warm start) and the OTR seed is the job's
`seed`, which also seeds the weights and the data order. `otr.estimator` / `otr.seed` are refused
unless they equal what `loss` / `seed` give (so a dumped config loads back).

Data paths of the form ``assets:NAME`` name the demo and A/B data files, generated on first use into a cache
(`otr_megatron.data.assets`); other paths are used as given.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field


from otr_megatron.config import reader
from otr_megatron.config.reader import OverrideError, load_yaml, parse_override, set_key
from otr_megatron.core.config import OTRConfig, UnknownOTRKeyError

ASSETS_PREFIX = "assets:"
LOSSES = ("otr", "otr-expected", "sft", "dft")
LOSS_TO_ESTIMATOR = {"otr": "sample", "otr-expected": "expected", "sft": "sft", "dft": "dft"}  # core estimator
JOB_OWNED_OTR_KEYS = {"estimator": "loss", "seed": "seed"}  # otr.KEY -> the job key it follows
SEED_LIMIT = 2**63
GIB = 2**30


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
class OptimConfig:
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_iters: int = 20
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    clip_grad: float = 1.0


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
    # the core config; K scaled down from the paper's 256 for the tiny CPU model
    otr: OTRConfig = field(default_factory=lambda: OTRConfig(num_samples=32))
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        """`otr.estimator` and `otr.seed` follow `loss` and `seed`, so `otr` reads as the fine-tuning
        stage's settings wherever it is printed (an unknown loss is left to `validate`)."""
        seed_ok = not isinstance(self.seed, bool) and isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT
        if self.loss in LOSSES and isinstance(self.otr, OTRConfig) and seed_ok:  # a bad seed: `validate` says so
            self.otr = dataclasses.replace(self.otr, estimator=LOSS_TO_ESTIMATOR[self.loss], seed=self.seed)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def total_iters(self) -> int:
        return self.pretrain_iters + self.finetune_iters

    def validate(self) -> "TrainConfig":
        """Cross-field checks, each error naming the key, its value and what was expected.

        Runs in the launching process before any data, model or worker exists, so a bad value costs
        a second, not a spawned job (and never trains silently: e.g. a learning rate <= 0 or a
        model size of 0 is refused here rather than training by gradient ascent or dividing by 0).
        """
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}; expected one of {LOSSES}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed={self.seed}; expected an integer in [0, 2**63) (megatron-core adds offsets to "
                              "it for its 64-bit RNG-tracker seeds)")
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

    def check_machine(self, use_cuda: bool, vocab_size: int, memory: tuple[int, str] | None = None) -> "TrainConfig":
        """The checks that depend on where the job runs, in the launching process after `validate`
        (also before any data, model or worker exists): bf16 and Transformer Engine need CUDA (and
        TE installed), and the job must fit the memory of a rank. The estimate (`memory_estimate`)
        is a lower bound, so a refused job could not have run; `memory` is (bytes per rank, what it
        is), default `machine_memory`."""
        m = self.model
        where = "device=cpu" if self.device == "cpu" else f"device={self.device} found no CUDA device"
        if m.bf16 and not use_cuda:
            raise ConfigError(f"model.bf16=true needs a CUDA GPU; this run is on the CPU ({where}); "
                              "set model.bf16=false (the CPU backend trains in float32)")
        if m.transformer_impl == "transformer_engine":
            import importlib.util

            if not use_cuda:
                raise ConfigError(f"model.transformer_impl='transformer_engine' needs a CUDA GPU; this run is on the "
                                  f"CPU ({where}); use model.transformer_impl=local")
            if importlib.util.find_spec("transformer_engine") is None:
                raise ConfigError("model.transformer_impl='transformer_engine' but the transformer_engine package is "
                                  "not installed; install it or use model.transformer_impl=local")
        need = memory_estimate(self, vocab_size)
        total = sum(v for v, _ in need.values())
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))  # ranks on this host (torchrun sets it)
        limit, what = memory or machine_memory(use_cuda, max(1, min(local, self.world_size)))
        if total > limit:
            part, (worst, key) = max(need.items(), key=lambda kv: kv[1][0])
            value = _get(self, key)
            parts = ", ".join(f"{n} ~{_gib(v)}" for n, (v, _) in need.items() if v >= total / 100)
            raise ConfigError(
                f"{key}={value} needs ~{_gib(total)} per rank ({parts}; a lower bound) but a rank has {_gib(limit)} "
                f"on this machine ({what}); "
                f"lower {key}{' or micro_batch_size' if key == 'data.seq_length' else ''}"
                f"{', or raise tp/pp' if part != 'OTR samples' else ''}"
            )
        return self

    def core_otr_config(self, mode: str | None = None) -> OTRConfig:
        """The core `OTRConfig` of stage `mode`: 'pretrain' (the cross-entropy warm start: estimator
        sft, Megatron's token mean) or a loss (default: the fine-tuning loss `loss`), with the job's
        seed. Also run by `validate`, so the core's rules (one rule, one place) hold before anything is
        launched; its error is re-worded to name the train-config keys (``otr.neg_reward``)."""
        mode = mode or self.loss
        if mode != "pretrain" and mode not in LOSSES:
            raise ConfigError(f"stage {mode!r}; expected 'pretrain' or one of {LOSSES}")
        pretrain = mode == "pretrain"
        try:
            return dataclasses.replace(
                self.otr,
                estimator="sft" if pretrain else LOSS_TO_ESTIMATOR[mode],
                seed=self.seed,
                normalization="token" if pretrain else self.otr.normalization,
            )
        except ValueError as e:
            raise ConfigError(_otr_keys(e)) from None

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
        if m.sequence_parallel and self.tp == 1:
            raise ConfigError("model.sequence_parallel=true needs tp > 1 (it splits the sequence over the "
                              "tensor-parallel ranks); set tp or model.sequence_parallel=false")
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


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _gib(n: float) -> str:
    """Bytes in GiB, TiB or PiB, three significant digits."""
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / GIB:.3g} GiB"


def memory_estimate(cfg: TrainConfig, vocab_size: int) -> dict[str, tuple[float, str]]:
    """Bytes one rank needs at least, per part: {part: (bytes, the key that sets its size)}.

    A deliberate lower bound (biases, norms, pipeline micro-batches in flight and allocator slack
    left out), so `check_machine` refuses only jobs that cannot run: weights 16 bytes per
    parameter (fp32 weight, fp32 gradient, Adam's two moments), the logits and their gradient in
    fp32, the unfused local attention's [b, heads/tp, s, s] probabilities kept per layer for the
    backward, four fp32 [s, b, h] activations per layer, and the OTR sample columns and weights
    (8 bytes per sample per token: int32 column, fp32 weight)."""
    m, d = cfg.model, cfg.data
    tp, pp = cfg.tp, cfg.pp
    div = m.make_vocab_size_divisible_by * tp
    vp = -(-vocab_size // div) * div
    h, f, s, b = m.hidden_size, m.ffn_hidden_size, d.seq_length, cfg.micro_batch_size
    layers = m.num_layers / pp
    params = layers * (4 * h * h + 2 * h * f) / tp + vp * h / tp
    if m.position_embedding_type == "learned_absolute":
        params += s * h
    out = {
        "weights and Adam state": (16.0 * params, "model.hidden_size"),
        "logits": (2 * 4.0 * b * s * vp / tp, "data.seq_length"),
        "activations": (layers * 4 * 4.0 * s * b * h, "data.seq_length"),
    }
    if m.transformer_impl == "local":
        out["attention scores"] = (layers * 4.0 * b * (m.num_attention_heads / tp) * s * s, "data.seq_length")
    if cfg.finetune_iters > 0 and cfg.loss == "otr":
        out["OTR samples"] = (8.0 * b * s * cfg.otr.num_samples, "otr.num_samples")
    return out


def machine_memory(use_cuda: bool, world: int) -> tuple[int, str]:
    """(bytes per rank, a description): a GPU's memory, or this host's RAM (the cgroup limit if
    lower) shared by the `world` processes a CPU job runs on it."""
    if use_cuda:
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"GPU memory of the {props.name}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="utf-8") as fh:
                ram = min(ram, int(fh.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    share = f", shared by {world} processes" if world > 1 else ""
    return ram // world, f"{_gib(ram)} of RAM{share}"


# ----------------------------------------------------------------------------------------------
# Parsing: OmegaConf schema from the dataclasses, the shared override grammar, then validation


def _otr_keys(e: Exception) -> str:
    """The core's message with its field names as train-config keys (OTRConfig.x -> otr.x)."""
    return str(e).replace("OTRConfig.", "otr.")


def _schema(cls=None):
    from omegaconf import OmegaConf

    conf = OmegaConf.structured(cls or TrainConfig)
    if "otr" in conf:  # the core config is a frozen dataclass; to_object rebuilds (and validates) it
        OmegaConf.set_readonly(conf.otr, False)
    return conf


class _Builder:
    """Defaults, then file and overrides set key by key; the job-owned `otr.*` keys are held back and
    checked against `loss` / `seed` once everything is applied."""

    def __init__(self, cls=None):
        self.conf = _schema(cls)
        self.owned: dict[str, typing.Any] = {}

    def set(self, key: str, value) -> None:
        if key == "otr" and isinstance(value, dict):
            for k, v in value.items():
                self.set(f"otr.{k}", v)
            return
        if key.startswith("otr."):
            name = key[len("otr."):]
            try:
                OTRConfig.check_keys({name: value})
            except UnknownOTRKeyError as e:
                raise ConfigError(str(e)) from None
            if name in JOB_OWNED_OTR_KEYS:
                self.owned[name] = value
                return
        try:
            set_key(self.conf, key, value)
        except OverrideError as e:
            raise ConfigError(str(e)) from None

    def merge(self, data: dict) -> None:
        for k, v in data.items():
            self.set(str(k), v)

    def build(self, literal: typing.Mapping[str, typing.Any] | None = None):
        """The typed config; `literal` top-level values (command-line flags) replace the built ones as
        given, never parsed as YAML nor resolved as interpolations (``-o 'runs/exp #2'`` stays that)."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = OmegaConf.to_object(self.conf)
            if literal:
                cfg = dataclasses.replace(cfg, **literal)  # re-runs __post_init__ (loss -> otr.estimator)
        except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that does not resolve
            raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]}") from None
        except ValueError as e:  # the core OTRConfig's own checks
            raise ConfigError(_otr_keys(e)) from None
        for name, value in self.owned.items():
            owner = JOB_OWNED_OTR_KEYS[name]
            if cfg.loss in LOSSES and value != getattr(cfg.otr, name):
                raise ConfigError(
                    f"otr.{name}={value!r}: the job sets it from `{owner}` ({owner}={getattr(cfg, owner)!r} gives "
                    f"{getattr(cfg.otr, name)!r}); set `{owner}` instead"
                )
        return cfg


def from_dict(cls, data: dict):
    """Build a TrainConfig (`cls`) from a nested dict such as `to_dict` gives; unknown keys raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of {cls.__name__} keys, got {data!r}")
    b = _Builder(cls)
    b.merge(data)
    return b.build()


def to_dict(cfg: TrainConfig) -> dict:
    """The job's keys: `otr` without the keys the job owns (`loss` and `seed` state them)."""
    d = dataclasses.asdict(cfg)
    for name in JOB_OWNED_OTR_KEYS:
        d["otr"].pop(name, None)
    return d


def load_config(path: str | None = None, overrides: typing.Sequence[str] = (),
                literal: typing.Mapping[str, typing.Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then each override, then the `literal` values (flags
    such as --output-dir: taken as given), then cross-field validation."""
    b = _Builder()
    if path:
        try:
            data = load_yaml(path)
        except OverrideError as e:
            raise ConfigError(str(e)) from None
        try:
            b.merge(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        try:
            b.set(*parse_override(text))
        except OverrideError as e:
            raise ConfigError(str(e)) from None
    unknown = set(literal or ()) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}")
    return b.build(literal).validate()


def assets_dir() -> str:
    """Where ``assets:`` files live: a cache generated on first use, not the package (which carries
    the generator, `otr_megatron.data.synthetic`)."""
    from otr_megatron.data.assets import assets_dir as generated_assets_dir  # lazy: `data` imports torch

    return generated_assets_dir()


def resolve_path(p: str) -> str:
    """``assets:NAME`` -> the generated file (written into the cache first if missing, so the first
    use of a fresh install needs no set-up step); other paths are used as given (user-expanded)."""
    if p.startswith(ASSETS_PREFIX):
        from otr_megatron.data.assets import asset_path

        return asset_path(p[len(ASSETS_PREFIX) :])
    return os.path.expanduser(p)


def _escape_interpolations(v):
    """A literal string that holds ``${`` (e.g. an --output-dir) is written as OmegaConf's escape
    ``\\${``, so the dump loads back as the same string rather than as an interpolation."""
    if isinstance(v, str):
        return v.replace("${", "\\${")
    if isinstance(v, dict):
        return {k: _escape_interpolations(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_escape_interpolations(x) for x in v]
    return v


def dump_yaml(cfg: TrainConfig) -> str:
    return reader.dump_yaml(_escape_interpolations(to_dict(cfg)), sort_keys=False)
