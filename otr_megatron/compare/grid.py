"""The grid of a comparison: arms (loss x knob values), seeds, and the warm start each run shares.

Knobs are crossed (``--sweep``: every combination) or varied one at a time around the config's own
values (``--vary``: a settings map, e.g. K, kappa and beta each moved alone from the default). An arm
whose knobs differ from another arm of the same loss only in keys that loss does not read
(`IGNORED_BY_LOSS`: SFT does not read K) is not run again: it shares that arm's runs (`Plan.shared`).

A *run* is one arm at one seed. Every run's config is resolved and validated here, in the harness
process, with the train job's own config code (defaults, YAML file, ``KEY=VALUE`` overrides), so a
typo fails before anything is launched. Runs whose configs agree on everything that affects the
cross-entropy warm start (all keys except `FINETUNE_ONLY`) share one warm start: a job of
`pretrain_iters` steps whose final checkpoint each arm copies and continues with ``--resume``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import yaml

from otr_megatron.config.reader import dump_yaml
from otr_megatron.train.config import LOSSES, SEED_LIMIT, ConfigError, TrainConfig, from_dict, load_config, to_dict

# Keys that only act after the warm start (or not on the weights at all). Sweeping anything else
# gives the affected arms their own warm start.
FINETUNE_ONLY = (
    "loss",
    "finetune_iters",
    "finetune_lr",
    "otr",
    "data.train",
    "output_dir",
    "resume",
    "stop_at_iteration",
    "progress_bar",
    "plot",
    "log_interval",
    "save_interval",
)
# The OTR knobs a loss does not read: arms of that loss that differ only in these share one run.
# (otr.estimator and otr.seed follow `loss` and `seed` in the train job.)
_OTR_MATH = ("otr.num_samples", "otr.temperature", "otr.neg_reward")
IGNORED_BY_LOSS = {"sft": _OTR_MATH, "dft": _OTR_MATH, "otr-expected": ("otr.num_samples",), "otr": ()}
# Set on every child run: the harness shows progress and makes its own plots.
CHILD_SETTINGS = {"progress_bar": False, "plot": False}


def _get(d: dict, dotted: str):
    for p in dotted.split("."):
        d = d[p]
    return d


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def config_hash(cfg_dict: dict) -> str:
    return hashlib.sha1(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:10]


def value_label(value) -> str:
    """Short, file-name-safe label of a sweep value (a data path -> its file stem)."""
    if isinstance(value, list):
        return "+".join(value_label(v) for v in value)
    if isinstance(value, str) and (("/" in value) or (":" in value) or value.endswith((".jsonl", ".parquet"))):
        value = os.path.splitext(os.path.basename(value.split(":", 1)[-1]))[0]
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


@dataclass(frozen=True)
class Sweep:
    """One swept config key and its values (in the order given)."""

    key: str
    values: tuple
    labels: tuple = ()  # one short name per value (default: derived from the value)
    # Values given again in another spelling (`1e-4,0.0001`): (text given, label of the value kept).
    duplicates: tuple = ()

    def __post_init__(self):
        if not self.labels:
            object.__setattr__(self, "labels", tuple(value_label(v) for v in self.values))


def _same_value(v) -> str:
    """What makes two sweep values one arm: numbers by value (1e-4 == 0.0001, 1 == 1.0), a bool is not
    a number, anything else by its JSON text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"number:{float(v)!r}"
    return "json:" + json.dumps(v, sort_keys=True, default=str)


def parse_sweep(text: str, option: str = "--sweep") -> Sweep:
    """``KEY=V1,V2,...`` (values parsed as YAML) or ``KEY=[V1, V2]`` for values that contain commas.

    A value given twice (also in another spelling, e.g. ``1e-4`` and ``0.0001``) is one arm, run
    once; `Sweep.duplicates` names what was dropped so the command can say so."""
    from otr_megatron.config.reader import OverrideError, safe_yaml_load

    if "=" not in text:
        raise ConfigError(f"{option} {text!r}: expected KEY=V1,V2,... e.g. finetune_lr=3e-4,1e-3")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key or not raw:
        raise ConfigError(f"{option} {text!r}: expected KEY=V1,V2,... with at least one value")
    if key in ("loss", "seed"):
        raise ConfigError(f"{option} {text!r}: use --losses / --seeds for {key!r}")
    source = f"{option} {text[:80]!r}"
    try:
        if raw.startswith("["):
            values = safe_yaml_load(raw, source)
            if not isinstance(values, list):
                raise ConfigError(f"{option} {text!r}: expected a YAML list of values")
            pieces = [json.dumps(v, default=str) for v in values]
            labels = [value_label(v) for v in values]
        else:
            pieces = [v.strip() for v in raw.split(",")]
            values = [safe_yaml_load(v, source) for v in pieces]  # the shared reader: 3e-4 is a number
            labels = [value_label(v) if isinstance(v, str) else value_label(p) for v, p in zip(values, pieces)]
    except yaml.YAMLError as e:
        raise ConfigError(f"{option} {text!r}: values are not valid YAML ({' '.join(str(e).split())})") from None
    except OverrideError as e:
        raise ConfigError(str(e)) from None
    if not values:
        raise ConfigError(f"{option} {text!r}: no values")
    kept: dict[str, int] = {}
    keep, dups = [], []
    for i, v in enumerate(values):
        same = _same_value(v)
        if same in kept:
            dups.append((pieces[i], labels[kept[same]]))
        else:
            kept[same] = i
            keep.append(i)
    values, labels = [values[i] for i in keep], [labels[i] for i in keep]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{option} {text!r}: different values must have different names, got labels {labels}")
    return Sweep(key, tuple(values), tuple(labels), tuple(dups))


def parse_losses(text: str) -> list[str]:
    losses = [s.strip() for s in text.split(",") if s.strip()]
    bad = [x for x in losses if x not in LOSSES]
    if bad or not losses:
        raise ConfigError(f"--losses {text!r}: expected a comma-separated subset of {', '.join(LOSSES)}")
    if len(set(losses)) != len(losses):
        raise ConfigError(f"--losses {text!r}: a loss is listed twice")
    return losses


def parse_seeds(text: str) -> list[int]:
    """Comma-separated distinct seeds, ASCII digits only, each in 0..2**63-1: the train job's
    seed range (`train.config.SEED_LIMIT`), so no arm is launched only to be refused."""
    pieces = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in pieces if not re.fullmatch(r"[0-9]+", s)]
    if bad or not pieces:
        raise ConfigError(f"--seeds {text!r}: {bad[0]!r} is not a seed; expected comma-separated integers "
                          f"in 0..2**63-1 (ASCII digits), e.g. 1,2,3" if bad else
                          f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3")
    seeds = [int(s) for s in pieces]
    big = [s for s in seeds if s >= SEED_LIMIT]
    if big:
        raise ConfigError(f"--seeds {text!r}: seed {big[0]} is out of range; expected integers in 0..2**63-1")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice; expected distinct integers")
    return seeds


@dataclass(frozen=True)
class Arm:
    """A grid point without its seed: a loss and one value per swept key."""

    loss: str
    knobs: tuple = ()  # ((key, value, label, short key), ...)

    @property
    def name(self) -> str:
        return "__".join([self.loss] + [f"{sk}={lab}" for _, _, lab, sk in self.knobs])

    @property
    def panel(self) -> str:
        """The arm without its loss: arms of one panel differ only in the loss."""
        return ", ".join(f"{sk}={lab}" for _, _, lab, sk in self.knobs) or "all"

    def overrides(self) -> list[str]:
        return [f"loss={self.loss}"] + [f"{k}={json.dumps(v)}" for k, v, _, _ in self.knobs]


@dataclass
class WarmStart:
    seed: int
    key: str  # hash of the warm-start config (seed included)
    family: str  # the same without the seed: warm starts of one family differ only in the seed
    cfg: TrainConfig
    dir: str
    runs: list["Run"] = field(default_factory=list)


@dataclass
class Run:
    arm: Arm
    seed: int
    cfg: TrainConfig
    warm: WarmStart
    dir: str

    @property
    def key(self) -> str:
        """Hash of what the run computes: its config without `output_dir` (a moved study directory
        keeps its runs) and without `resume` (always on for an arm)."""
        return config_hash(run_identity(self.cfg))

    @property
    def legacy_key(self) -> str:
        """The hash studies written before the output path left the hash used (kept readable)."""
        return config_hash(to_dict(self.cfg))


def run_identity(cfg: TrainConfig) -> dict:
    """A run's config without the keys that say where it lives, not what it computes."""
    d = to_dict(cfg)
    d.pop("output_dir", None)
    d.pop("resume", None)
    return d


@dataclass
class Plan:
    out: str
    losses: list[str]
    seeds: list[int]
    sweeps: list[Sweep]
    arms: list[Arm]
    warm_starts: list[WarmStart]
    runs: list[Run]
    base_overrides: list[str]
    config_path: str | None
    varies: list[Sweep] = field(default_factory=list)
    # (arm, run): arms whose results are another arm's run (the knobs that differ are ignored by the loss)
    shared: list[tuple[Arm, "Run"]] = field(default_factory=list)


def _warm_dict(cfg: TrainConfig) -> dict:
    """The run's config with every fine-tune-only key at its default: what the warm start trains."""
    d = to_dict(cfg)
    default = to_dict(TrainConfig())
    for k in FINETUNE_ONLY:
        _set(d, k, copy.deepcopy(_get(default, k)))
    d.update(CHILD_SETTINGS)
    d["finetune_iters"] = 0
    return d


def _one_at_a_time(varies: list[Sweep], short: list[str], base: dict) -> list[tuple]:
    """The base point (no knob moved) first, then each varied key moved alone to each of its values
    that differs from the base config's own."""
    combos: list[tuple] = [()]
    for s, sk in zip(varies, short):
        try:
            at = _same_value(_get(base, s.key))
        except (KeyError, TypeError):
            raise ConfigError(f"--vary {s.key}=...: no such config key") from None
        combos += [((s.key, v, lab, sk),) for v, lab in zip(s.values, s.labels) if _same_value(v) != at]
    return combos


def build_plan(
    out: str,
    config_path: str | None,
    overrides: list[str],
    losses: list[str],
    seeds: list[int],
    sweeps: list[Sweep],
    varies: list[Sweep] = (),
) -> Plan:
    """Resolve every run's config (raises ConfigError naming the bad key) and group warm starts."""
    varies = list(varies)
    keys = [s.key for s in [*sweeps, *varies]]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep/--vary: a key is given twice ({keys})")
    # Names use the last part of each key (data.train -> train) unless two keys share it.
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = last if len(set(last)) == len(last) else keys
    combos: list[tuple] = [()]
    for s, sk in zip(sweeps, short):
        combos = [c + ((s.key, v, lab, sk),) for c in combos for v, lab in zip(s.values, s.labels)]
    base = load_config(config_path, overrides)
    if varies:
        around = _one_at_a_time(varies, short[len(sweeps):], to_dict(base))
        combos = [c + a for c in combos for a in around]
    arms = [Arm(loss, c) for c in combos for loss in losses]
    if base.pretrain_iters < 1:
        raise ConfigError(
            f"pretrain_iters={base.pretrain_iters}: the harness shares a cross-entropy warm start between "
            "arms; expected pretrain_iters >= 1"
        )
    # An arm shares the runs of the first arm of its loss that agrees on every knob the loss reads.
    owner: dict[tuple, Arm] = {}
    runs_of: dict[Arm, list[Run]] = {}
    shared_arms: list[tuple[Arm, Arm]] = []
    for arm in arms:
        ignored = IGNORED_BY_LOSS.get(arm.loss, ())
        reads = (arm.loss, tuple((k, _same_value(v)) for k, v, _, _ in arm.knobs if k not in ignored))
        if reads in owner:
            shared_arms.append((arm, owner[reads]))
        else:
            owner[reads] = arm
            runs_of[arm] = []
    warm: dict[str, WarmStart] = {}
    runs: list[Run] = []
    for seed in seeds:
        for arm in runs_of:
            cfg = load_config(config_path, [*overrides, *arm.overrides(), f"seed={seed}"])
            if cfg.finetune_iters < 1:
                raise ConfigError(f"arm {arm.name}: finetune_iters={cfg.finetune_iters}; expected >= 1")
            wd = _warm_dict(cfg)
            wkey = config_hash(wd)
            if wkey not in warm:
                fam = config_hash({**wd, "seed": None})
                same_seed = [w for w in warm.values() if w.seed == seed]
                wdir = os.path.join(out, f"seed{seed}", "warm_start" + (f"_{wkey}" if same_seed else ""))
                wd["output_dir"] = wdir
                warm[wkey] = WarmStart(seed, wkey, fam, from_dict(TrainConfig, wd).validate(), wdir)
            w = warm[wkey]
            d = to_dict(cfg)
            d.update(CHILD_SETTINGS)
            d["output_dir"] = os.path.join(out, f"seed{seed}", arm.name)
            d["resume"] = True
            run = Run(arm, seed, from_dict(TrainConfig, d).validate(), w, d["output_dir"])
            w.runs.append(run)
            runs.append(run)
            runs_of[arm].append(run)
    shared = [(arm, run) for arm, own in shared_arms for run in runs_of[own]]
    return Plan(out, losses, seeds, list(sweeps), arms, list(warm.values()), runs, list(overrides), config_path,
                varies, shared)


def dump_config(cfg: TrainConfig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        dump_yaml(dataclasses.asdict(cfg), f, sort_keys=False)
    return path
