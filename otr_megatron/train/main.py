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
import signal
import sys
import time

from otr_megatron.distributed import free_port, teardown_parallel
from otr_megatron.train.config import LOSSES, ConfigError, TrainConfig, dump_yaml, load_config
from otr_megatron.train.errors import NothingToDo, as_user_error, error_line, exit_code, user_errors
from otr_megatron.train.rundir import existing_results, pid_alive, prepare_output_dir, vocab_size

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
errors (config, data, checkpoint, output directory in use, no space left) print one line and exit 2;
a diverged run (non-finite loss, gradient norm or weights) stops before saving them and exits 1.
--output-dir is a path taken literally (never parsed as YAML). SIGTERM (SLURM's time limit,
scancel, timeout, kill, docker stop) and SIGHUP stop the job like Ctrl-C: every worker process
ends, the lock is released, exit 128 + the signal number; --resume continues from the last
checkpoint. A --resume with nothing left to train changes nothing and exits 0.
"""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WORKER_GRACE_S = 20.0  # how long stopped workers get to unwind before they are killed
_stop_signal: list[int] = []  # the signal that stopped this process (first one wins)
_exiting: list[bool] = []  # set once a worker is past its work: a stop signal then only ends it quietly
_owner: list[int] = []  # the pid that installed the handlers (a forked child inherits them, not the role)
_in_fork: list[bool] = []  # set from before a fork until its last hook in the parent has run (`guard_forks`)


def _on_stop_signal(signum, frame):
    """SIGTERM/SIGHUP take the Ctrl-C path: a KeyboardInterrupt in the main thread, so every
    `finally` runs (lock, temporary directory, workers) and the interpreter exits normally (which
    shuts down megatron-core's multiprocessing manager and resource tracker). Only the first signal
    raises; later ones arrive while stopping and are ignored."""
    if _owner and os.getpid() != _owner[0]:
        # a child forked by megatron-core or a library (its manager, a writer), possibly still inside
        # the fork hooks of logging or filelock, where an exception prints "Exception ignored ...
        # Traceback": end it the way the signal would without our handler, quietly
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _in_fork:  # inside a fork's hooks (logging's, filelock's), where an exception is printed and lost
        import threading

        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()  # again, once the fork is done
        return
    if _stop_signal:
        return
    _stop_signal.append(signum)
    if _exiting:  # in the interpreter's exit (joining megatron-core's manager): let it finish
        return
    raise KeyboardInterrupt


def install_stop_handlers() -> dict:
    """Route the stop signals to `_on_stop_signal`; returns the previous handlers (main restores them,
    so calling `main` in-process, as the tests do, leaves the caller's Ctrl-C alone)."""
    _stop_signal.clear()
    _owner[:] = [os.getpid()]
    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, _on_stop_signal)
    except ValueError:  # not the main thread: signals cannot be handled here
        pass
    return previous


def guard_forks() -> None:
    """Mark the time a fork spends in its hooks: registered after every library the job imports, our
    `before` hook runs first and our `after_in_parent` hook last, so a stop signal that arrives in
    between (megatron-core's checkpoint writers fork) is delivered again once the fork is done."""
    if getattr(guard_forks, "done", False) or not hasattr(os, "register_at_fork"):
        return
    guard_forks.done = True
    os.register_at_fork(before=lambda: _in_fork.append(True), after_in_parent=_in_fork.clear,
                        after_in_child=_in_fork.clear)


def _set_parent_death_signal() -> None:
    """Linux: a worker gets SIGTERM if its launcher dies (even by SIGKILL), so none outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _stopped_code() -> int:
    return 128 + (_stop_signal[0] if _stop_signal else int(signal.SIGINT))


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
    """The flags are values as given (argparse types them); only KEY=VALUE overrides are YAML.
    `-o 'runs/exp #2'` is that directory, `-o 007` is '007', `-o true` is 'true'."""
    args = build_parser().parse_intermixed_args(argv)
    literal = {k: getattr(args, k) for k in ("loss", "tp", "pp", "dp", "device", "output_dir")
               if getattr(args, k) is not None}
    if args.resume:
        literal["resume"] = True
    return load_config(args.config, list(args.overrides), literal=literal), args


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
    if err_dir is not None:  # a spawned worker: stop like the launcher, and never outlive it
        _set_parent_death_signal()
        install_stop_handlers()
    try:
        try:
            _run_rank(rank, world, cfg, port, threads)
        except OSError as e:
            user = as_user_error(e)  # no space left: the user's to fix
            if user is None:
                raise
            raise user from None
        finally:
            if err_dir is not None:  # what is left is the exit; a stop signal now must not interrupt it
                _exiting.append(True)
    except user_errors() as e:
        if err_dir is None:
            raise
        with open(os.path.join(err_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "code": exit_code(e), "line": error_line(e)}, f)
        sys.exit(exit_code(e))
    except BaseException:
        if err_dir is None or not _stop_signal:
            raise
        # stopped by a signal (or a peer that was): exit quietly; the launcher reports it once. A
        # SystemExit (not KeyboardInterrupt, which torch's wrapper turns into exit 0) runs the
        # normal interpreter exit, so this worker's multiprocessing manager is shut down too.
        sys.exit(_stopped_code())


def _run_rank(rank: int, world: int, cfg: TrainConfig, port: int | None, threads: int | None) -> None:
    import torch

    from otr_megatron import console

    console.drop_internal_logs()  # megatron-core >= 0.17's notices about itself ("GPTModel IS DEPRECATED")

    use_cuda = _use_cuda(cfg)
    if not use_cuda:
        from otr_megatron.mcore.cpu_backend import enable_cpu_mode

        enable_cpu_mode(force=True)
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
        guard_forks()  # after setup: megatron-core, datasets and filelock have registered their fork hooks
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
    ctx = None
    try:
        ctx = mp.start_processes(_worker, args=(world, cfg, port, threads, err_dir), nprocs=world, join=False,
                                 start_method="spawn")
        # grace period: the other ranks usually hit the same error and exit on their own
        while not ctx.join(grace_period=10):
            pass
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop every worker before the lock is released
        if ctx is not None:
            stop_processes([p.pid for p in ctx.processes])
        raise
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if _stop_signal:  # a worker ended because of the stop; the rest are stopped too
            stop_processes([p.pid for p in ctx.processes])
            raise KeyboardInterrupt from None
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


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc), for the processes a worker started (megatron-core's
    multiprocessing manager); [] where /proc is unavailable."""
    kids = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return kids
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _descendants(pids: list[int]) -> list[int]:
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c in _children(p) if c not in out]
    return out


def stop_processes(pids: list[int], grace_s: float = WORKER_GRACE_S, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to `pids` (each unwinds like Ctrl-C: handlers installed by `_worker`), wait up to
    `grace_s` for them, then SIGKILL them and anything they started that is still running."""
    tree = _descendants([p for p in pids if pid_alive(p)])
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    tree += [c for c in _descendants([p for p in pids if pid_alive(p)]) if c not in tree]
    for p in tree:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _interrupt_advice(cfg: TrainConfig, argv: list[str]) -> str:
    """What to run after a stop that works: --resume only if there is a checkpoint it accepts,
    else a fresh start (with --overwrite if this run already wrote results)."""
    from otr_megatron.train.checkpoint import inspect_resume
    from otr_megatron.train.errors import TrainJobError

    out = cfg.output_dir
    try:
        info = inspect_resume(cfg, os.path.join(out, "checkpoints"))
        return f"continue from the checkpoint of iteration {info.iteration} with the same settings and --resume -o {out}"
    except NothingToDo:
        return f"the run had finished; its results are in {out}"
    except TrainJobError:
        pass
    if existing_results(out):
        return (f"no checkpoint was saved yet; start again with the same settings and --overwrite -o {out} "
                "(it replaces the partial results)")
    return "no checkpoint was saved yet; start again with the same command"


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
    previous = install_stop_handlers()
    torchrun_rank = None
    try:
        env_world = os.environ.get("WORLD_SIZE")
        if env_world is not None and "RANK" in os.environ:  # launched by torchrun (or SLURM + torchrun)
            rank = torchrun_rank = int(os.environ["RANK"])
            if int(env_world) != world:
                raise ConfigError(
                    f"WORLD_SIZE={env_world} from the launcher but tp x pp x dp = "
                    f"{cfg.tp} x {cfg.pp} x {cfg.dp} = {world}; set --dp so that they match"
                )
            cfg.check_machine(_use_cuda(cfg), vocab_size(cfg))  # every rank: the same one-line error
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
        cfg.check_machine(use_cuda, vocab_size(cfg))  # before the output directory is touched
        lock = prepare_output_dir(cfg, overwrite=args.overwrite)
        if use_cuda and world > 1:
            import subprocess

            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "otr_megatron.cli", "train", *argv]
            print("launch " + " ".join(cmd), flush=True)
            proc = subprocess.Popen(cmd, env=dict(os.environ, **{LOCK_HELD_ENV: "1"}))
            try:
                return proc.wait()
            except KeyboardInterrupt:  # torchrun forwards SIGTERM to its workers and waits for them
                stop_processes([proc.pid], grace_s=2 * WORKER_GRACE_S)
                proc.wait()
                raise
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // world)
        if world == 1:
            _worker(0, 1, cfg, port, None)
            return 0
        return _spawn(world, cfg, port, threads)
    except NothingToDo as e:
        print(error_line(e), flush=True)
        return 0
    except user_errors() as e:
        print(error_line(e), file=sys.stderr)
        return exit_code(e)
    except OSError as e:
        user = as_user_error(e)
        if user is None:
            raise
        print(error_line(user), file=sys.stderr)
        return exit_code(user)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM/SIGHUP: one line instead of a [rank0] traceback
        for sig in STOP_SIGNALS:  # a second signal while this is printed changes nothing
            signal.signal(sig, signal.SIG_IGN)
        if not torchrun_rank:  # one line per job: the launcher, or rank 0 under torchrun
            name = signal.Signals(_stopped_code() - 128).name
            print(f"otr-megatron train: stopped by {name}; {_interrupt_advice(cfg, argv)}", file=sys.stderr)
        return _stopped_code()
    finally:
        if lock is not None:
            lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    from otr_megatron import console

    console.install()  # megatron-core's "not installed" warnings: one line
    sys.exit(main())
