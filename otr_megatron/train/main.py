"""`otr-megatron train`: OTR fine-tuning with megatron-core; no arguments runs the embedded CPU demo.

Launch: world = tp x pp x dp processes. Under torchrun (RANK/WORLD_SIZE set) each process joins
the given group (NCCL on GPU, gloo on CPU). Otherwise on CPU this command spawns the processes
itself with gloo; on GPU with world > 1 it re-executes itself through `torch.distributed.run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from otr_megatron.distributed import free_port, teardown_parallel
from otr_megatron.train.config import LOSSES, ConfigError, TrainConfig, dump_yaml, load_config

EPILOG = """\
overrides: any config key as KEY=VALUE (YAML value), e.g.
  otr-megatron train finetune_iters=300 optim.lr=3e-4 otr.num_samples=64 data.pack=false
examples:
  otr-megatron train                              # embedded default: CE warm start, then OTR (CPU, minutes)
  otr-megatron train --loss sft --output-dir runs/sft   # A/B baseline on identical data and seeds
  otr-megatron train --tp 2                        # two gloo processes on CPU
  otr-megatron train --resume --output-dir runs/tiny_cpu
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="otr-megatron train",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (see below)")
    p.add_argument("--config", "-c", help="YAML config file (default: the embedded tiny CPU job)")
    p.add_argument("--loss", choices=LOSSES, help="fine-tuning loss (default from the config: otr)")
    p.add_argument("--tp", type=int, help="tensor-parallel size")
    p.add_argument("--pp", type=int, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, help="data-parallel size")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (auto: CUDA if available)")
    p.add_argument("--output-dir", "-o", help="metrics, plot, checkpoints (default runs/tiny_cpu)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def resolve_config(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("loss", "loss"), ("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("device", "device"), ("output_dir", "output_dir")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.resume:
        overrides.append("resume=true")
    return load_config(args.config, overrides), args


def _use_cuda(cfg: TrainConfig) -> bool:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch.cuda.is_available() is False; use --device cpu")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def _worker(rank: int, world: int, cfg: TrainConfig, port: int | None, threads: int | None) -> None:
    """One rank: process group, CPU backend if needed, then the trainer."""
    import torch

    use_cuda = _use_cuda(cfg)
    if not use_cuda:
        from otr_megatron.mcore.cpu_backend import enable_cpu_backend

        enable_cpu_backend(force=True)
        if threads:
            torch.set_num_threads(threads)
    if not torch.distributed.is_initialized():
        if port is not None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(port)
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            init_method="env://",
        )
    from otr_megatron.train.trainer import Trainer

    try:
        tr = Trainer(cfg)
        tr.setup()
        tr.run()
    finally:
        teardown_parallel()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, args = resolve_config(argv)
    except ConfigError as e:
        print(f"otr-megatron train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    world = cfg.world_size
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and "RANK" in os.environ:  # launched by torchrun (or SLURM + torchrun)
        if int(env_world) != world:
            print(
                f"otr-megatron train: WORLD_SIZE={env_world} from the launcher but tp x pp x dp = "
                f"{cfg.tp} x {cfg.pp} x {cfg.dp} = {world}; set --dp so that they match",
                file=sys.stderr,
            )
            return 2
        _worker(int(os.environ["RANK"]), world, cfg, None, None)
        return 0
    try:
        use_cuda = _use_cuda(cfg)
    except ConfigError as e:
        print(f"otr-megatron train: {e}", file=sys.stderr)
        return 2
    if use_cuda and world > 1:
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "otr_megatron.cli", "train", *argv]
        print("launch " + " ".join(cmd), flush=True)
        return subprocess.call(cmd)
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world)
    if world == 1:
        _worker(0, 1, cfg, port, None)
        return 0
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, cfg, port, threads), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
