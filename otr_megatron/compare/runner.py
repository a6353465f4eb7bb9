"""Execute a `Plan`: warm starts, arms and probes as subprocesses, resumable, with progress.

Each task is one subprocess (`otr-megatron train ...` or the probe), its output in ``<dir>/run.log``.
A finished task leaves ``compare_done.json`` (the config hash it ran with, wall time, command); a
second invocation skips it when the hash matches and refuses (naming the run) when the config
changed. An arm starts by copying its warm start's final checkpoint (and metrics) into its own
directory and continuing it with ``--resume`` and its own loss: every arm of a seed starts from
bit-identical weights, optimizer state and data position; an interrupted arm continues from its
newest checkpoint. The train job owns the checkpoint layout: the copy and its ``latest`` are made by
`train.checkpoint.copy_checkpoint` (atomic, so an arm killed mid-copy starts the copy over). Tasks run ``--jobs`` at a time (threads = cores / jobs each); a failed task is
reported with the tail of its log and only the tasks depending on it are skipped.

A task counts as finished only with its result on disk: `summary.json` with a final evaluation after
all its iterations (the probe: `probe.json`). A run that exits 0 without it failed; a done marker
whose result is gone is run again; a finished result whose marker is missing (interrupted between
the two) is recorded as done, never resumed again. Each task runs in its own session, so a Ctrl-C
or SIGTERM reaches the harness alone, which hands one SIGINT to each running task and waits for it
(the train job saves and exits); a second one kills them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from otr_megatron.compare.grid import Plan, Run, WarmStart, config_hash, dump_config, run_identity
from otr_megatron.train import checkpoint as ckpt

DONE = "compare_done.json"
OK = ("done", "skipped-done")


class CompareError(RuntimeError):
    """A run directory holds results of a different config, or a task cannot be prepared."""


def _train_supports_overwrite() -> bool:
    from otr_megatron.train.main import build_parser

    return any("--overwrite" in a.option_strings for a in build_parser()._actions)


def _read_done(d: str) -> dict | None:
    try:
        with open(os.path.join(d, DONE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


@dataclass
class Task:
    kind: str  # 'warm' | 'arm' | 'probe'
    name: str
    dir: str
    key: str
    deps: list["Task"] = field(default_factory=list)
    run: Run | None = None
    warm: WarmStart | None = None
    status: str = "pending"  # pending | skipped-done | done | failed | blocked
    wall_s: float = 0.0
    note: str = ""
    legacy_key: str | None = None  # the hash older harness versions wrote for this run (output path in it)

    @property
    def cfg(self):
        return self.warm.cfg if self.kind == "warm" else self.run.cfg if self.kind == "arm" else None


def missing_result(t: Task) -> str | None:
    """Why `t` has no usable result on disk, or None: a run needs `summary.json` with a final
    evaluation after all its iterations, the probe its `probe.json`."""
    if t.kind == "probe":
        return None if isinstance(_read_json(os.path.join(t.dir, "probe.json")), dict) else "no probe.json"
    s = _read_json(os.path.join(t.dir, "summary.json"))
    if not isinstance(s, dict):
        return "no readable summary.json"
    if not s.get("final_eval"):
        return "summary.json has no final evaluation (final_eval is null)"
    want = t.cfg.total_iters
    if s.get("iterations") != want:
        return f"summary.json is at iteration {s.get('iterations')}, the run has {want}"
    return None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Runner:
    def __init__(self, plan: Plan, jobs: int = 1, python: str = sys.executable, log=print,
                 probe_rules: dict | None = None, dry_run: bool = False):
        self.plan = plan
        self.jobs = max(1, jobs)
        self.python = python
        self.log = log
        self.rules = dict(probe_rules or {})
        self.dry_run = dry_run
        self.overwrite_flag = _train_supports_overwrite()
        self.cfg_dir = os.path.join(plan.out, "configs")
        self.tasks = self._tasks()
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}  # task name -> running subprocess
        self._stopping = False

    # -- the task graph -------------------------------------------------------------------------
    def _tasks(self) -> list[Task]:
        tasks: list[Task] = []
        for w in self.plan.warm_starts:
            base = os.path.basename(w.dir)
            wt = Task("warm", f"seed{w.seed}/{base}", w.dir, w.key, warm=w)
            arms = [Task("arm", f"seed{r.seed}/{r.arm.name}", r.dir, r.key, deps=[wt], run=r, warm=w,
                         legacy_key=r.legacy_key) for r in w.runs]
            probe = "probe" + base[len("warm_start"):]
            tasks += [wt, *arms, Task("probe", f"seed{w.seed}/{probe}", os.path.join(os.path.dirname(w.dir), probe),
                                      self._probe_key(w, arms), deps=[wt, *arms], warm=w)]
        return tasks

    def _probe_key(self, w: WarmStart, arms: list[Task]) -> str:
        return config_hash({"warm": w.key, "runs": sorted((t.name, t.key) for t in arms), "rules": self.rules})

    # -- state ----------------------------------------------------------------------------------
    def check_existing(self, strict: bool = True) -> None:
        """Mark finished tasks; refuse if a finished run used a different config (strict=False, for
        --report-only: report it anyway, with a warning; e.g. the train config gained a key since).

        Finished means a done marker of this config and the result on disk. A marker without its result
        is dropped (the task runs again, named in the log); a result without its marker (the harness
        stopped between the two) is recorded as done when the run's own config.yaml is this config."""
        for t in self.tasks:
            done = _read_done(t.dir)
            if done is None:
                if t.kind != "probe":
                    self._adopt(t)
                continue
            key = done.get("key")
            same = key == t.key or (t.legacy_key is not None and key == t.legacy_key)
            if not same and not strict and t.kind != "probe":
                self.log(f"warning: {t.dir} ran with config hash {key}, the grid now gives {t.key}")
            elif not same:
                if t.kind == "probe":  # the set of runs changed: probe again (cheap, no results lost)
                    continue
                raise CompareError(
                    f"{t.dir} holds a finished {t.kind} run of a different config (hash {key}, this "
                    f"grid needs {t.key}); use another --output-dir, or delete {t.dir} to run it again"
                )
            why = missing_result(t)
            if why is not None:
                self.log(f"warning: {t.name} has a done marker but {why}; it is run again")
                continue
            t.status = "skipped-done"
            t.wall_s = float(done.get("wall_s", 0.0))

    def _adopt(self, t: Task) -> bool:
        """A run that finished (result on disk, its config.yaml = this run's config) but has no done
        marker: write the marker instead of resuming it again."""
        from otr_megatron.train.config import ConfigError, load_config

        if missing_result(t) is not None or not os.path.isfile(os.path.join(t.dir, "config.yaml")):
            return False
        try:
            saved = run_identity(load_config(os.path.join(t.dir, "config.yaml"), []))
        except (ConfigError, ValueError, OSError):
            return False
        if config_hash(saved) != config_hash(run_identity(t.cfg)):
            return False
        s = _read_json(os.path.join(t.dir, "summary.json"))
        _write_json(os.path.join(t.dir, DONE), {"key": t.key, "kind": t.kind, "wall_s": 0.0, "command": None,
                                                "recovered": f"finished run found without its done marker "
                                                             f"(summary.json at iteration {s.get('iterations')})",
                                                "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        self.log(f"found  {t.kind:5s} {t.name}: finished (summary.json at iteration {s.get('iterations')}) "
                 "without its done marker; recorded as done, not run again")
        t.status = "skipped-done"
        return True

    def _command(self, t: Task) -> list[str]:
        if t.kind == "probe":
            return [self.python, "-W", "ignore", "-m", "otr_megatron.compare.probe", os.path.join(t.dir, "spec.json")]
        cfg = t.warm.cfg if t.kind == "warm" else t.run.cfg
        cfg_path = dump_config(cfg, os.path.join(self.cfg_dir, t.name.replace("/", os.sep) + ".yaml"))
        cmd = [self.python, "-W", "ignore", "-m", "otr_megatron.cli", "train", "--config", cfg_path,
               "--output-dir", t.dir]
        if t.kind == "arm":
            cmd.append("--resume")
        elif self.overwrite_flag:
            cmd.append("--overwrite")
        return cmd

    def _prepare(self, t: Task) -> None:
        os.makedirs(t.dir, exist_ok=True)
        done_path = os.path.join(t.dir, DONE)
        if os.path.exists(done_path):
            os.remove(done_path)
        if t.kind == "warm" and not self.overwrite_flag:  # an older train job without --overwrite
            for name in ("metrics.jsonl", "summary.json", "config.yaml", "checkpoints"):
                p = os.path.join(t.dir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
        elif t.kind == "arm" and ckpt.read_latest(os.path.join(t.dir, "checkpoints")) is None:
            # Start from a copy of the warm start's final checkpoint and its metrics (so the arm's
            # curves include the warm start). The metrics first: ``latest`` is what marks the copy
            # finished, and copy_checkpoint moves it last; any partial state is replaced.
            src = os.path.join(t.warm.dir, "metrics.jsonl")
            if os.path.isfile(src):
                dst = os.path.join(t.dir, "metrics.jsonl")
                shutil.copyfile(src, dst + ".tmp")
                os.replace(dst + ".tmp", dst)
            try:
                ckpt.copy_checkpoint(os.path.join(t.warm.dir, "checkpoints"), os.path.join(t.dir, "checkpoints"))
            except ckpt.CheckpointError as e:
                raise CompareError(f"warm start {t.warm.dir}: {e}") from None
        elif t.kind == "probe":
            ok = [tt for tt in t.deps if tt.kind == "arm" and tt.status in OK]
            t.key = self._probe_key(t.warm, ok)  # a partial probe is redone once the missing arms finish
            runs = {tt.name.split("/", 1)[1]: tt.dir for tt in ok}
            spec = {"config": dump_config(t.warm.cfg, os.path.join(self.cfg_dir, t.name.replace("/", os.sep) + ".yaml")),
                    "base": t.warm.dir, "runs": runs, "rules": self.rules, "out": os.path.join(t.dir, "probe.json"),
                    "device": t.warm.cfg.device}
            _write_json(os.path.join(t.dir, "spec.json"), spec)

    def _execute(self, t: Task, threads: int) -> None:
        self._prepare(t)
        cmd = self._command(t)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env["PYTHONUNBUFFERED"] = "1"
        t0 = time.time()
        with open(os.path.join(t.dir, "run.log"), "a", encoding="utf-8") as logf:
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            with self._lock:
                if self._stopping:
                    t.note = "interrupted before it started"
                    return
                # Its own session: a terminal's Ctrl-C reaches the harness only, which forwards it once.
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self._procs[t.name] = proc
            try:
                rc = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(t.name, None)
        t.wall_s = time.time() - t0
        if self._stopping:  # interrupted: whatever it left is continued by the next invocation
            t.note = f"interrupted (exit status {rc})"
            return
        if rc != 0:
            t.status = "failed"
            t.note = f"exit status {rc}; last lines of {os.path.join(t.dir, 'run.log')}:\n" + _tail(os.path.join(t.dir, "run.log"))
            return
        why = missing_result(t)
        if why is not None:
            t.status = "failed"
            t.note = (f"exit status 0 but {why}; last lines of {os.path.join(t.dir, 'run.log')}:\n"
                      + _tail(os.path.join(t.dir, "run.log")))
            return
        _write_json(os.path.join(t.dir, DONE), {"key": t.key, "kind": t.kind, "wall_s": t.wall_s, "command": cmd,
                                                "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        t.status = "done"

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> list[Task]:
        self.check_existing()
        todo = [t for t in self.tasks if t.status == "pending"]
        n_total, n_skip = len(self.tasks), len(self.tasks) - len(todo)
        n_shared = len({a for a, _ in self.plan.shared})
        arms = f"{len(self.plan.arms)} arms" + (f", {n_shared} of them sharing another arm's runs" if n_shared else "")
        self.log(f"compare: {len(self.plan.runs)} runs ({arms}; x {len(self.plan.seeds)} seeds), "
                 f"{len(self.plan.warm_starts)} warm starts, {sum(t.kind == 'probe' for t in self.tasks)} probes; "
                 f"{n_skip} of {n_total} tasks already finished; {self.jobs} at a time -> {self.plan.out}")
        if self.dry_run:
            for arm, r in self.plan.shared:
                if r.seed == self.plan.seeds[0]:
                    self.log(f"  {arm.name}: shares {r.arm.name} (the knobs that differ are not read by {arm.loss})")
            for t in todo:
                self.log(f"  would run {t.kind:5s} {t.name}: {' '.join(self._command_preview(t))}")
            return self.tasks
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // self.jobs)
        start = time.time()
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            try:
                self._loop(pool, todo, threads, start, n_skip, n_total)
            except KeyboardInterrupt:
                self.stop()
                raise
        return self.tasks

    def stop(self) -> None:
        """Interrupt: one SIGINT to each running task (the train job saves and exits), then wait for
        them; a second Ctrl-C (or SIGTERM) meanwhile kills them."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs.items())
        for name, proc in procs:
            if proc.poll() is None:
                self.log(f"stop   {name}: interrupting it (it saves and exits; rerun to continue)")
                _signal_group(proc, signal.SIGINT)
        try:
            for _, proc in procs:
                proc.wait()
        except KeyboardInterrupt:
            for name, proc in procs:
                if proc.poll() is None:
                    self.log(f"kill   {name}")
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()

    def _loop(self, pool, todo, threads, start, n_skip, n_total) -> None:
        finished = 0
        running: dict = {}
        while True:
            for t in todo:
                if len(running) >= self.jobs:
                    break
                if t.status != "pending" or t in running.values():
                    continue
                state = self._readiness(t)
                if state == "blocked":
                    t.status, t.note = "blocked", "a run it depends on failed"
                    self.log(f"skip   {t.kind:5s} {t.name}: {t.note}")
                if state != "ready":
                    continue
                self.log(f"start  {t.kind:5s} {t.name}")
                running[pool.submit(self._execute, t, threads)] = t
            if not running:
                break
            done_set, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done_set:
                t = running.pop(fut)
                try:
                    fut.result()
                except Exception as e:  # preparing the task failed (not the subprocess)
                    t.status, t.note = "failed", f"{type(e).__name__}: {e}"
                finished += 1
                elapsed = time.time() - start
                eta = self._eta(todo)
                self.log(f"{t.status:6s} {t.kind:5s} {t.name} in {t.wall_s:.0f} s   "
                         f"[{n_skip + finished}/{n_total} tasks, {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left]")
                if t.status == "failed":
                    self.log("  " + t.note.replace("\n", "\n  "))

    def _eta(self, todo: list[Task]) -> float:
        """Seconds left: the mean time of each kind of task (warm starts, arms and probes differ a
        lot) times how many of that kind are left, spread over the parallel jobs."""
        took = {}
        for k in ("warm", "arm", "probe"):
            xs = [t.wall_s for t in todo if t.kind == k and t.status in ("done", "failed")]
            took[k] = sum(xs) / len(xs) if xs else None
        known = [v for v in took.values() if v is not None]
        fallback = max(known) if known else 0.0
        left = sum((took[t.kind] if took[t.kind] is not None else fallback)
                   for t in todo if t.status == "pending")
        return left / self.jobs

    @staticmethod
    def _readiness(t: Task) -> str:
        """'ready', 'wait' or 'blocked'. A probe runs once every arm has settled, on those that finished."""
        if t.deps and t.deps[0].status in ("failed", "blocked"):
            return "blocked"
        if t.kind == "probe":
            settled = all(d.status in (*OK, "failed", "blocked") for d in t.deps)
            return "ready" if settled else "wait"
        if any(d.status in ("failed", "blocked") for d in t.deps):
            return "blocked"
        return "ready" if all(d.status in OK for d in t.deps) else "wait"

    def _command_preview(self, t: Task) -> list[str]:
        if t.kind == "probe":
            return ["python", "-m", "otr_megatron.compare.probe", os.path.join(t.dir, "spec.json")]
        cmd = ["otr-megatron", "train", "--config", os.path.join(self.cfg_dir, t.name + ".yaml"), "--output-dir", t.dir]
        return cmd + (["--resume"] if t.kind == "arm" else (["--overwrite"] if self.overwrite_flag else []))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a task's whole session (the train job and any workers it spawned)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [x for x in f.read().splitlines() if "UserWarning" not in x and "warnings.warn" not in x]
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"

