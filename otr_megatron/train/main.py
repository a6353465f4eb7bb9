"""`otr-megatron train`: OTR fine-tuning with megatron-core; no arguments runs the embedded CPU demo.

Launch: world = tp x pp x dp processes. Under torchrun (RANK/WORLD_SIZE set) each process joins
the given group (NCCL on GPU, gloo on CPU). Otherwise on CPU this command spawns the processes
itself with gloo; on GPU with world > 1 it re-executes itself through `torch.distributed.run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from otr_megatron.distributed import free_port, teardown_parallel
from otr_megatron.train.config import LOSSES, ConfigError, TrainConfig, dump_yaml, load_config
from otr_megatron.train.errors import error_line, exit_code, user_errors
from otr_megatron.train.rundir import prepare_output_dir

LOCK_HELD_ENV = "OTR_MEGATRON_TRAIN_LOCK_HELD"  # set for torchrun children of a launcher that holds the lock

EPILOG = """\
overrides: any config key as KEY=VALUE (OmegaConf dotlist: the value is YAML; the same grammar as
`otr-megatron plan` and `otr-megatron slurm --config`), applied after --config, e.g.
  otr-megatron train finetune_iters=300 optim.lr=3e-4 otr.num_samples=64 otr.backend=torch data.pack=false
`otr:` takes every field of the core OTRConfig except estimator (set by --loss) and seed (the job's seed).
examples:
  otr-megatron train                              # embedded default: CE warm start, then OTR (CPU, minutes)
  otr-megatron train --loss sft --output-dir runs/sft   # A/B baseline on identical data and seeds
  otr-megatron train --tp 2                        # two gloo processes on CPU
  otr-megatron train --resume --output-dir runs/tiny_cpu   # continue (falls back past a damaged checkpoint)
  otr-megatron train --overwrite                   # start again in a directory that holds results
errors (config, data, checkpoint, output directory in use) print one line and exit 2; a diverged
run (non-finite loss, gradient norm or weights) stops before saving them and exits 1.
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of a previous run in --output-dir (a fresh run refuses otherwise)")
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


def _worker(rank: int, world: int, cfg: TrainConfig, port: int | None, threads: int | None,
            err_dir: str | None = None) -> None:
    """One rank: process group, CPU backend if needed, then the trainer.

    err_dir (spawned workers): a user error (config, data, checkpoint, divergence) is written there
    as its one-line message and the process exits with its status, so the launcher prints one line
    instead of torch's per-rank traceback. In-process (err_dir None) the error propagates to `main`.
    """
    try:
        _run_rank(rank, world, cfg, port, threads)
    except user_errors() as e:
        if err_dir is None:
            raise
        with open(os.path.join(err_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "code": exit_code(e), "line": error_line(e)}, f)
        sys.exit(exit_code(e))


def _run_rank(rank: int, world: int, cfg: TrainConfig, port: int | None, threads: int | None) -> None:
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


def _reported_error(err_dir: str) -> tuple[int, str] | None:
    """(exit status, line) of the lowest rank that reported a user error, if any did."""
    found = []
    for name in os.listdir(err_dir):
        try:
            with open(os.path.join(err_dir, name), encoding="utf-8") as f:
                rec = json.load(f)
            found.append((int(rec["rank"]), int(rec["code"]), str(rec["line"])))
        except (OSError, ValueError, KeyError):
            continue
    if not found:
        return None
    _, code, line = min(found)
    return code, line


def _spawn(world: int, cfg: TrainConfig, port: int, threads: int) -> int:
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    err_dir = tempfile.mkdtemp(prefix="otr-megatron-train-")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "Terminating process N via SIGTERM" after a reported error
    try:
        ctx = mp.start_processes(_worker, args=(world, cfg, port, threads, err_dir), nprocs=world, join=False,
                                 start_method="spawn")
        # grace period: the other ranks usually hit the same error and exit on their own
        while not ctx.join(grace_period=10):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        reported = _reported_error(err_dir)
        if reported is None:  # a crash, not a user error: keep torch's report with the traceback
            raise
        code, line = reported
        print(line, file=sys.stderr)
        return code
    finally:
        spawn_log.setLevel(level)
        shutil.rmtree(err_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse and validate everything in this process, take the output directory, then launch."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, args = resolve_config(argv)
    except ConfigError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    world = cfg.world_size
    lock = None
    try:
        env_world = os.environ.get("WORLD_SIZE")
        if env_world is not None and "RANK" in os.environ:  # launched by torchrun (or SLURM + torchrun)
            rank = int(os.environ["RANK"])
            if int(env_world) != world:
                raise ConfigError(
                    f"WORLD_SIZE={env_world} from the launcher but tp x pp x dp = "
                    f"{cfg.tp} x {cfg.pp} x {cfg.dp} = {world}; set --dp so that they match"
                )
            if rank == 0 and not os.environ.get(LOCK_HELD_ENV):
                # the other ranks wait in the rendezvous of init_process_group until rank 0 is past this
                lock = prepare_output_dir(cfg, overwrite=args.overwrite)
            try:
                _worker(rank, world, cfg, None, None)
            except user_errors() as e:
                if rank == 0:  # every rank raises the same error; one line is enough
                    print(error_line(e), file=sys.stderr)
                return exit_code(e)
            return 0
        use_cuda = _use_cuda(cfg)
        lock = prepare_output_dir(cfg, overwrite=args.overwrite)
        if use_cuda and world > 1:
            import subprocess

            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "otr_megatron.cli", "train", *argv]
            print("launch " + " ".join(cmd), flush=True)
            return subprocess.call(cmd, env=dict(os.environ, **{LOCK_HELD_ENV: "1"}))
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // world)
        if world == 1:
            _worker(0, 1, cfg, port, None)
            return 0
        return _spawn(world, cfg, port, threads)
    except user_errors() as e:
        print(error_line(e), file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:  # Ctrl-C: one line instead of a [rank0] traceback; the lock is released below
        print(f"otr-megatron train: interrupted; continue from the last checkpoint with --resume -o {cfg.output_dir}",
              file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
