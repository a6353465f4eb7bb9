"""`otr-megatron` command line: one entry point, each subcommand owned by its layer.

Subcommands import their framework lazily, so `otr-megatron slurm` works on a login node that has
neither Megatron-Bridge nor a GPU.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "train": ("otr_megatron.train.main", "OTR fine-tuning with Megatron-Core (embedded default runs on this machine)"),
    "demo": ("otr_megatron.demo", "run the vocab-parallel OTR loss under tensor parallelism and explain it"),
    "bridge": ("otr_megatron.bridge.cli", "run a Megatron-Bridge recipe with OTR turned on"),
    "slurm": ("otr_megatron.launch.slurm", "write an sbatch script for a train or bridge command"),
    "plan": ("otr_megatron.planning.cli", "memory and communication budget per GPU for a configuration"),
    "compare": ("otr_megatron.compare.cli", "A/B harness: the train job over losses, knobs and seeds; mean +- std"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: otr-megatron <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `otr-megatron <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"otr-megatron: unknown command {name!r}; expected one of {sorted(SUBCOMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
