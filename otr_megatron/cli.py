"""`otr-megatron` command line: one entry point, each subcommand owned by its layer, one override grammar.

Subcommands import their framework lazily, so `otr-megatron slurm` works on a login node that has
neither Megatron-Bridge nor a GPU.

Config files and `KEY=VALUE` overrides are read by one module for every command
(`otr_megatron/config/reader.py`); the cluster-job files (`configs/<model>.yaml`) have a typed schema
and a preflight (`otr_megatron/config/cluster_job.py`).
"""

from __future__ import annotations

import importlib
import sys

# The reader lives in otr_megatron/config/reader.py; these names stay importable from here.
from otr_megatron.config.reader import (  # noqa: F401
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    OverrideError,
    load_config_dict,
    load_yaml,
    parse_override,
    safe_yaml_load,
    set_key,
)

# name -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "train": ("otr_megatron.train.main", "OTR fine-tuning with Megatron-Core (embedded default runs on this machine)"),
    "demo": ("otr_megatron.demo", "run the vocab-parallel OTR loss under tensor parallelism and explain it"),
    "bridge": ("otr_megatron.bridge.cli", "run a Megatron-Bridge recipe with OTR turned on"),
    "nemo": ("otr_megatron.nemo.cli", "run a NeMo 2.x (nemo-toolkit 2.7) recipe with OTR turned on"),
    "slurm": ("otr_megatron.launch.slurm", "write an sbatch script for a train or bridge command"),
    "plan": ("otr_megatron.planning.cli", "memory and communication budget per GPU for a configuration"),
    "compare": ("otr_megatron.compare.cli", "A/B harness: the train job over losses, knobs and seeds; mean +- std"),
}
# The setup.py extra that holds what a subcommand needs (`bridge` runs in a NeMo Framework container).
EXTRAS = {"train": "train", "compare": "train", "demo": "mcore", "plan": "launch", "slurm": "launch"}



def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: otr-megatron <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `otr-megatron <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `otr-megatron` command; `argv` None means the real command line (then the console is made quiet)."""
    if argv is None:
        from otr_megatron import console

        console.install()  # megatron-core's "not installed" warnings: one line (otr_megatron/console.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"otr-megatron: unknown command {name!r}; expected one of {sorted(SUBCOMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)
    except ModuleNotFoundError as e:  # `pip install otr-megatron` alone installs only the loss (torch)
        if not e.name or e.name.split(".")[0] == "otr_megatron":
            raise
        hint = f"pip install 'otr-megatron[{EXTRAS[name]}]'" if name in EXTRAS else "see the README's containers"
        print(f"otr-megatron {name}: needs the module {e.name!r}, which is not installed; {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
