"""`otr-megatron compare`: run the train job over a grid of losses, knobs and seeds; report mean +- std.

With no arguments it runs the shipped A/B study (data: `otr_megatron/data/synthetic.py`): one
cross-entropy warm start per seed on an old task plus a prior for new-task prompts, then every loss on
three fine-tuning tasks (new task with one fixed label per prompt = null control; new task with the
label drawn among many correct answers; more of the old task) at one learning rate: 36 runs, about 20
min on an idle 2-core machine. The learning-rate frontier, the settings map and the surface-forms study
are their own commands (README, "Does OTR help?").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

from otr_megatron.train.config import LOSSES, ConfigError

# The shipped study (configs/compare_ab.yaml holds the same train settings; a test keeps them equal).
AB_TRAIN = {
    "pretrain_iters": 800,
    "pretrain_lr": 2.0e-3,
    "finetune_iters": 150,
    "finetune_lr": 1.0e-4,
    "micro_batch_size": 16,
    "global_batch_size": 32,
    "eval_interval": 0,
    "data": {
        "pretrain": ["assets:ab_pretrain.jsonl"],
        "train": ["assets:ab_parity_uniform.jsonl"],
        "eval": {
            "old": ["assets:ab_strings_eval.jsonl"],
            "ood": ["assets:ab_strings_ood.jsonl"],
            "long": ["assets:ab_strings_long.jsonl"],
            "parity": ["assets:ab_parity_eval.jsonl"],
        },
    },
}
# One learning rate (AB_TRAIN's 1e-4): the fair comparison across learning rates is the frontier study.
AB_SWEEPS = [
    "data.train=assets:ab_parity_fixed.jsonl,assets:ab_parity_uniform.jsonl,assets:ab_strings_train.jsonl",
]
DEFAULT_LOSSES = ("sft", "dft", "otr-expected", "otr")  # the baseline first
AB_RULES = {"parity": "parity_digit"}
AB_METRICS = ["parity/greedy_valid", "parity/valid_mass", "parity/base_mode_mass", "parity/kl_answer",
              "parity/kl_valid", "old/exact_match", "old/ce", "old/kl_response", "ood/exact_match", "ood/ce"]
AB_FRONTIER = ("parity/valid_mass", "old/ce")
# --quick: the same harness end to end in a couple of minutes (CI): 2 losses x 2 seeds, a tiny model.
QUICK_OVERRIDES = ["pretrain_iters=30", "finetune_iters=10", "finetune_lr=1e-3", "eval_interval=0", "model.num_layers=1",
                   "model.hidden_size=32", "model.num_attention_heads=2", "model.ffn_hidden_size=64",
                   "otr.num_samples=8"]
QUICK_SWEEPS = ["data.train=assets:ab_parity_uniform.jsonl"]

EPILOG = """\
examples:
  otr-megatron compare                          # the shipped study (4 losses x 3 tasks x 3 seeds, ~20 min on 2 cores)
  otr-megatron compare --losses sft,dft,otr --sweep finetune_lr=3e-5,1e-4,3e-4,1e-3 \
      --frontier parity/valid_mass,old/ce -o runs/frontier     # learning-rate frontier
  otr-megatron compare --sweep data.train=assets:ab_parity_fixed.jsonl,assets:ab_parity_uniform.jsonl \
      --vary otr.num_samples=1,4,32,256 --vary otr.temperature=0.7,1.0,1.3,2.0 \
      --vary otr.neg_reward=0,-0.05,-0.1,-0.3,-1 -o runs/map   # settings map: one knob at a time
  otr-megatron compare --quick                  # 2 losses x 2 seeds, tiny model (CI)
  otr-megatron compare --config my.yaml data.train=my_sft.jsonl --losses sft,otr --seeds 1,2,3,4,5 \\
      --sweep finetune_lr=1e-5,3e-5 --sweep otr.temperature=1.0,1.3 -o runs/my_ab
  otr-megatron compare -o runs/my_ab --report-only   # re-make the tables and plots
Finished runs are skipped when the command is repeated (interrupt and rerun to continue).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otr-megatron compare", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train config overrides for every run")
    p.add_argument("--config", "-c", help="train YAML config (default: the shipped A/B study)")
    p.add_argument("--losses", help=f"comma-separated fine-tuning losses from {','.join(LOSSES)} (default: {','.join(DEFAULT_LOSSES)})")
    p.add_argument("--seeds", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--sweep", action="append", default=None, metavar="KEY=V1,V2",
                   help="a config key and its values; repeat for a product grid (default study: task x finetune_lr)")
    p.add_argument("--vary", action="append", default=None, metavar="KEY=V1,V2",
                   help="a config key moved alone from the config's value (one at a time, not crossed); repeat "
                        "for a settings map; crossed with every --sweep point")
    p.add_argument("--output-dir", "-o", help="where runs and the report go (default runs/compare[_quick])")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="runs at a time (default: number of cores, at most 2; threads per run = cores / jobs)")
    p.add_argument("--reference", help="loss the paired differences are taken against (default sft if in the grid)")
    p.add_argument("--metrics", help="comma-separated metrics for the table and plot (default: per split)")
    p.add_argument("--answer-rule", action="append", default=None, metavar="SPLIT=RULE",
                   help="score the answer position of an eval split (rule: parity_digit)")
    p.add_argument("--frontier", metavar="X,Y", help="also plot metric Y against metric X per arm")
    p.add_argument("--quick", action="store_true", help="small end-to-end grid: 2 losses x 2 seeds, tiny model")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    return p


def _git_commit() -> str | None:
    """HEAD of the source tree (+ a note if it has uncommitted changes). A run from an exported tree
    (`git archive`) has no repository: OTR_MEGATRON_GIT_COMMIT names the commit it was exported from."""
    if os.environ.get("OTR_MEGATRON_GIT_COMMIT"):
        return os.environ["OTR_MEGATRON_GIT_COMMIT"] + " (exported tree)"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


def _machine() -> dict:
    import torch

    try:
        import megatron.core as mc

        mcore = getattr(mc, "__version__", "?")
    except ImportError:
        mcore = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": platform.node(), "cpu": cpu, "cores": cores, "python": platform.python_version(),
            "torch": torch.__version__, "megatron_core": mcore,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _ab_overrides() -> list[str]:
    out = []

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict) and k != "eval":
                walk(f"{prefix}{k}.", v)
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")

    walk("", AB_TRAIN)
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C or SIGTERM (a SLURM time limit, `kill`, `timeout`): the running tasks are interrupted
    (each saves and exits), nothing is marked done that did not finish, and one line says how to
    continue."""
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread (called from a test's thread): leave SIGTERM alone
        pass
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("otr-megatron compare: interrupted; finished runs are kept and an interrupted run continues from "
              "its latest checkpoint: repeat the same command to continue", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _write_atomic(path: str, text: str) -> None:
    """Replace `path` whole or not at all (an interrupt mid-write leaves the previous file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclasses.dataclass
class _Study:
    """What the command line asks for, checked: the grid, the answer rules and how to run it."""

    argv: list
    default_study: bool
    overrides: list
    losses: list
    seeds: list
    sweeps: list
    rules: dict
    out: str
    plan: object
    jobs: int
    reference: str | None


def _parse_study(args, argv: list[str]) -> _Study:
    """The command line as a checked study; a ConfigError names the option and the value."""
    from otr_megatron.compare.grid import build_plan, parse_losses, parse_seeds, parse_sweep
    from otr_megatron.compare.probe import RULES

    default_study = args.config is None
    overrides = (_ab_overrides() if default_study else []) + (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    losses = parse_losses(args.losses or ("sft,otr" if args.quick else ",".join(DEFAULT_LOSSES)))
    seeds = parse_seeds(args.seeds or ("1,2" if args.quick else "1,2,3"))
    if args.sweep is not None:
        sweep_texts = args.sweep
    elif default_study:
        sweep_texts = QUICK_SWEEPS if args.quick else AB_SWEEPS
    else:
        sweep_texts = []
    sweeps = [parse_sweep(s) for s in sweep_texts]
    varies = [parse_sweep(s, option="--vary") for s in args.vary or []]
    for opt, sws in (("--sweep", sweeps), ("--vary", varies)):
        for sw in sws:
            for given, kept in sw.duplicates:
                print(f"otr-megatron compare: {opt} {sw.key}: {given} is the same value as {kept}; "
                      "running that arm once", file=sys.stderr)
    rules = dict(AB_RULES) if default_study else {}
    for r in args.answer_rule or []:
        if "=" not in r:
            raise ConfigError(f"--answer-rule {r!r}: expected SPLIT=RULE, e.g. parity=parity_digit")
        split, rule = r.split("=", 1)
        rules[split.strip()] = rule.strip()
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs}; expected an integer >= 1")
    out = args.output_dir or ("runs/compare_quick" if args.quick else "runs/compare")
    plan = build_plan(out, args.config, overrides, losses, seeds, sweeps, varies)
    for split, rule in rules.items():
        if rule not in RULES:
            raise ConfigError(f"--answer-rule {split}={rule}: unknown rule; expected one of {RULES}")
        if split not in plan.runs[0].cfg.data.eval:
            raise ConfigError(f"--answer-rule {split}={rule}: no evaluation split {split!r} "
                              f"(splits: {sorted(plan.runs[0].cfg.data.eval)})")
    reference = args.reference or ("sft" if "sft" in losses else None)
    if reference is not None and reference not in losses:
        raise ConfigError(f"--reference {reference!r} is not one of --losses {losses}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return _Study(argv=argv, default_study=default_study, overrides=overrides, losses=losses, seeds=seeds,
                  sweeps=sweeps, rules=rules, out=out, plan=plan, jobs=args.jobs or max(1, min(2, cores)),
                  reference=reference)


def _missing_runs(plan, table: dict, tasks) -> list[str]:
    """Every planned run is either in the tables or named here with the reason: none vanishes."""
    by_dir = {t.dir: t for t in tasks}
    missing = []
    for r in plan.runs:
        if r.seed in table.get(r.arm.panel, {}).get(r.arm.loss, {}):
            continue
        t = by_dir[r.dir]
        if t.status in ("done", "skipped-done"):
            why = "no final evaluation in its summary.json"
        elif t.status == "pending":
            why = t.note or "not run"
        else:
            why = f"{t.status}: {t.note.splitlines()[0] if t.note else ''}"
        missing.append(f"seed{r.seed}/{r.arm.name} ({why})")
    return missing


def _study_record(st: _Study, args, tasks, missing: list[str], started: str, wall: float) -> dict:
    """study.json: the command, the machine and every invocation that ran tasks (a resumed study has
    several), kept across invocations."""
    study_path = os.path.join(st.out, "study.json")
    prev = {}
    if os.path.isfile(study_path):
        try:
            with open(study_path, encoding="utf-8") as f:
                prev = json.load(f)
        except (OSError, ValueError):
            prev = {}
        if not isinstance(prev, dict):
            prev = {}
    ran = sum(t.status in ("done", "failed") for t in tasks)
    failed = [t for t in tasks if t.status in ("failed", "blocked")]
    command = "otr-megatron compare " + " ".join(st.argv)
    return {
        "command": command,
        "git_commit": _git_commit(),
        "machine": _machine(),
        "losses": st.losses, "seeds": st.seeds, "sweeps": [s.key + "=" + ",".join(s.labels) for s in st.sweeps],
        "varies": [s.key + "=" + ",".join(s.labels) for s in st.plan.varies],
        "jobs": st.jobs, "answer_rules": st.rules, "overrides": st.overrides, "config": args.config,
        "invocations": prev.get("invocations", []) + ([] if args.report_only or not ran else [
            {"started": started, "wall_s": wall, "tasks_run": ran, "git_commit": _git_commit(), "command": command}]),
        "task_wall_s_total": sum(t.wall_s for t in tasks),
        "finished_runs": len(st.plan.runs) - len(missing),  # runs whose results are in the tables
        "planned_runs": len(st.plan.runs),
        "missing_runs": missing,
        "failed": [f"{t.name}: {t.note.splitlines()[0] if t.note else ''}" for t in failed],
    }


def _header(study: dict, n_seeds: int, jobs: int, missing: list[str]) -> str:
    m = study["machine"]
    commits = sorted({str(i.get("git_commit")) for i in study["invocations"]}) or [str(study["git_commit"])]
    first = study["invocations"][0].get("command", study["command"]) if study["invocations"] else study["command"]
    header = (f"# otr-megatron compare: {study['finished_runs']} of {study['planned_runs']} runs finished\n\n"
              f"`{first}`, runs at commit {', '.join(commits)}; {m['cores']} cores ({m['cpu']}), "
              f"torch {m['torch']}, megatron-core {m['megatron_core']}; {n_seeds} seeds planned; "
              f"wall time {sum(i['wall_s'] for i in study['invocations']) / 60:.1f} min over "
              f"{len(study['invocations'])} invocation(s) running {jobs} tasks at a time; sum of task times "
              f"{study['task_wall_s_total'] / 60:.1f} min.")
    if missing:
        header += (f"\n\n**Not in these tables ({len(missing)} of {study['planned_runs']} runs, so not in the paired "
                   f"differences either):** " + "; ".join(missing) + ".")
    return header


def _report(st: _Study, args, tasks, started: str, wall: float) -> int:
    """results.json, study.json, results.md and the plots; exit 1 if any run has no result."""
    from otr_megatron.compare.report import (collect, default_metrics, frontier_gap, frontier_markdown, markdown,
                                             plot, plot_frontier, summarize)

    table = collect(st.plan, tasks)
    summary = summarize(st.plan, table, st.reference)
    missing = _missing_runs(st.plan, table, tasks)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else (
        AB_METRICS if st.default_study else default_metrics(summary))
    failed = [t for t in tasks if t.status in ("failed", "blocked")]
    pending = [t for t in tasks if t.status == "pending"]
    study = _study_record(st, args, tasks, missing, started, wall)
    summary["study"] = study
    fr = [m.strip() for m in args.frontier.split(",")] if args.frontier else (
        list(AB_FRONTIER) if st.default_study else None)
    if fr and len(fr) != 2:
        print(f"otr-megatron compare: --frontier {args.frontier!r}: expected X,Y (two metrics); no frontier made",
              file=sys.stderr)
        fr = None
    summary["frontier"] = frontier_gap(summary, fr[0], fr[1], st.reference) if fr and st.reference else []
    _write_atomic(os.path.join(st.out, "results.json"), json.dumps(summary, indent=1))
    _write_atomic(os.path.join(st.out, "study.json"), json.dumps(study, indent=1))
    md = markdown(summary, metrics, _header(study, len(st.seeds), st.jobs, missing)) + frontier_markdown(
        summary["frontier"])
    _write_atomic(os.path.join(st.out, "results.md"), md)
    png = None
    if summary["panels"]:
        commits = sorted({str(i.get("git_commit")) for i in study["invocations"]}) or [str(study["git_commit"])]
        png = plot(summary, metrics, os.path.join(st.out, "results.png"), st.losses,
                   title=f"mean ± std over seeds, dots = seeds; runs at commit {', '.join(c[:12] for c in commits)}")
        if fr:
            plot_frontier(summary, fr[0], fr[1], os.path.join(st.out, "frontier.png"), st.losses)
    print(md)
    print(f"compare: results {os.path.join(st.out, 'results.md')}, {os.path.join(st.out, 'results.json')}"
          + (f", plot {png}" if png else ""))
    if failed or pending or missing:
        print(f"compare: {len(failed)} tasks failed or were skipped, {len(pending)} not run, {len(missing)} of "
              f"{len(st.plan.runs)} runs without results: " + "; ".join([t.name for t in failed + pending] + missing),
              file=sys.stderr)
        return 1
    return 0


def _main(argv: list[str] | None = None) -> int:
    """Parse and check the study, run (or dry-run) its tasks, then report."""
    from otr_megatron.compare.runner import CompareError, Runner

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    try:
        st = _parse_study(args, argv)
    except ConfigError as e:
        print(f"otr-megatron compare: {e}", file=sys.stderr)
        return 2
    os.makedirs(st.out, exist_ok=True)
    runner = Runner(st.plan, jobs=st.jobs, probe_rules=st.rules, dry_run=args.dry_run)
    t0 = time.time()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    try:
        if args.report_only:
            runner.check_existing(strict=False)
            tasks = runner.tasks
        else:
            tasks = runner.run()
    except CompareError as e:
        print(f"otr-megatron compare: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    return _report(st, args, tasks, started, time.time() - t0)


if __name__ == "__main__":
    from otr_megatron import console

    console.install()  # megatron-core's "not installed" warnings: one line
    sys.exit(main())
