"""Aggregate finished runs: mean +- std and n per metric per arm, paired differences, Markdown/JSON/plots.

Metrics of a run: the job's final evaluation (``summary.json``: ``<split>/ce``, ``token_acc``,
``exact_match``) and the probe's (``<split>/kl_answer``, ...). The warm start is reported as its
own row ("warm start (CE)") of every panel it belongs to. std is the sample standard deviation
(ddof=1; 0 when n=1). Paired differences subtract, seed by seed, the reference loss's run of the
same panel (same warm start, same data): the seed-to-seed variation of the warm start cancels.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from otr_megatron.compare.grid import Plan

WARM = "warm start (CE)"


# Two-sided 95% quantiles of Student's t, df = 1..30 (beyond: the Cornish-Fisher expansion below).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df={df}; expected >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_stats(diffs: list[float]) -> dict:
    """mean, std, n and the 95% t-interval of the mean of paired differences over seeds; `shown` when
    the interval excludes 0 (n >= 2). The t-interval assumes the per-seed differences are roughly
    normal; with n = 3 it is wide (half-width 2.48 std), which is the honest price of 3 seeds."""
    mean, std = _mean_std(diffs)
    n = len(diffs)
    out = {"mean": mean, "std": std, "n": n}
    if n >= 2:
        half = t975(n - 1) * std / math.sqrt(n)
        out.update(ci95=[mean - half, mean + half], shown=bool(mean - half > 0 or mean + half < 0))
    else:
        out.update(ci95=None, shown=False)
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _eval_metrics(run_dir: str) -> dict | None:
    s = _load_json(os.path.join(run_dir, "summary.json"))
    if not s or not s.get("final_eval"):
        return None
    return {k: float(v) for k, v in s["final_eval"].items() if not k.endswith("/samples")}


def collect(plan: Plan, tasks) -> dict:
    """{panel: {row: {seed: {metric: value}}}} over finished runs (rows: losses and the warm start)."""
    ok = {t.dir for t in tasks if t.status in ("done", "skipped-done")}
    probes = {}
    for t in tasks:
        if t.kind == "probe" and t.dir in ok:
            probes[t.warm.dir] = _load_json(os.path.join(t.dir, "probe.json")) or {}
    table: dict = defaultdict(lambda: defaultdict(dict))
    # An arm that shares another arm's run (`Plan.shared`) gets that run's numbers in its own panel.
    for arm, r in [(r.arm, r) for r in plan.runs] + list(plan.shared):
        panel = arm.panel
        pr = probes.get(r.warm.dir, {})
        if r.warm.dir in ok:
            m = _eval_metrics(r.warm.dir)
            if m is not None:
                m.update({k: v for k, v in pr.get("__warm_start__", {}).items() if k != "iteration"})
                table[panel][WARM][r.seed] = m
        if r.dir in ok:
            m = _eval_metrics(r.dir)
            if m is not None:
                m.update({k: v for k, v in pr.get(r.arm.name, {}).items() if k != "iteration"})
                table[panel][arm.loss][r.seed] = m
    return table


def summarize(plan: Plan, table: dict, reference: str | None) -> dict:
    """JSON-ready summary: per panel and row, per metric mean/std/n and the per-seed values."""
    panels = []
    order = {p: i for i, p in enumerate(dict.fromkeys(a.panel for a in plan.arms))}
    for panel in sorted(table, key=lambda p: order.get(p, 1e9)):
        rows_out = []
        rows = table[panel]
        for row in [WARM, *plan.losses]:
            if row not in rows:
                continue
            per_seed = rows[row]
            metrics = sorted({k for m in per_seed.values() for k in m})
            stats = {}
            for k in metrics:
                seeds = sorted(s for s in per_seed if k in per_seed[s])
                vals = [per_seed[s][k] for s in seeds]
                mean, std = _mean_std(vals)
                stats[k] = {"mean": mean, "std": std, "n": len(vals), "seeds": seeds, "values": vals}
            rows_out.append({"row": row, "n": len(per_seed), "metrics": stats})
        paired = []
        if reference and reference in rows:
            ref = rows[reference]
            for row in plan.losses:
                if row == reference or row not in rows:
                    continue
                stats = {}
                for k in sorted({k for m in rows[row].values() for k in m}):
                    seeds = sorted(s for s in rows[row] if s in ref and k in rows[row][s] and k in ref[s])
                    if not seeds:
                        continue
                    diffs = [rows[row][s][k] - ref[s][k] for s in seeds]
                    stats[k] = {**paired_stats(diffs), "seeds": seeds, "values": diffs}
                paired.append({"row": f"{row} - {reference}", "metrics": stats})
        panels.append({"panel": panel, "rows": rows_out, "paired": paired})
    return {"panels": panels, "reference": reference}


def _fmt(st: dict | None, n_row: int) -> str:
    if st is None:
        return "-"
    a = abs(st["mean"])
    if 0 < a < 0.01:  # small KLs: keep significant digits instead of printing 0.000
        text = f"{st['mean']:.2e} ± {st['std']:.1e}"
    else:
        digits = 3 if a < 100 else 1
        text = f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"
    return text if st["n"] == n_row else f"{text} (n={st['n']})"


def _num(x: float) -> str:
    a = abs(x)
    return f"{x:+.2e}" if 0 < a < 0.01 else f"{x:+.3f}" if a < 100 else f"{x:+.1f}"


def fmt_paired(st: dict | None, n_row: int | None = None) -> str:
    """``mean ± std [95% interval]``, bold when the interval excludes 0 ("shown"), else plain."""
    if st is None:
        return "-"
    text = f"{_num(st['mean'])} ± {abs(st['std']):.3g}"
    if st.get("ci95"):
        text += f" [{_num(st['ci95'][0])}, {_num(st['ci95'][1])}]"
    if n_row is not None and st["n"] != n_row:
        text += f" (n={st['n']})"
    return f"**{text}**" if st.get("shown") else text


PAIRED_LEGEND = ("mean ± std over seeds [95% t-interval of the mean, df = n - 1]; **bold** = shown (the interval "
                 "excludes 0), plain = not shown")


def default_metrics(summary: dict) -> list[str]:
    """Every split's exact match and CE, then the probe's headline metrics, in a stable order."""
    keys = set()
    for p in summary["panels"]:
        for r in p["rows"]:
            keys |= set(r["metrics"])
    splits = sorted({k.split("/")[0] for k in keys})
    out = []
    for s in splits:
        for m in ("greedy_valid", "valid_mass", "kl_answer", "base_mode_mass", "exact_match", "ce"):
            if f"{s}/{m}" in keys:
                out.append(f"{s}/{m}")
    return out


def markdown(summary: dict, metrics: list[str], header: str = "") -> str:
    lines = [header] if header else []
    for p in summary["panels"]:
        lines += ["", f"**{p['panel']}** (mean ± std over seeds; n = seeds)", ""]
        lines.append("| arm | n | " + " | ".join(metrics) + " |")
        lines.append("|---|---|" + "---|" * len(metrics))
        for r in p["rows"]:
            cells = [_fmt(r["metrics"].get(m), r["n"]) for m in metrics]
            lines.append(f"| {r['row']} | {r['n']} | " + " | ".join(cells) + " |")
        if p["paired"]:
            lines += ["", f"paired difference vs {summary['reference']} (same seed, same warm start; "
                      f"{PAIRED_LEGEND}):", ""]
            lines.append("| difference | n | " + " | ".join(metrics) + " |")
            lines.append("|---|---|" + "---|" * len(metrics))
            for r in p["paired"]:
                n = max((st["n"] for st in r["metrics"].values()), default=0)
                cells = [fmt_paired(r["metrics"].get(m), n) for m in metrics]
                lines.append(f"| {r['row']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short_panel(panel: str) -> str:
    """Tick label of a panel: its knob values only, one per line (the keys go on the axis label)."""
    return "\n".join(part.split("=", 1)[-1] for part in panel.split(", "))


def plot(summary: dict, metrics: list[str], path: str, losses: list[str], title: str = "") -> str:
    """One panel per metric: a bar per (panel, arm) with std error bars and the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_order = [WARM, *losses]
    colors = {row: plt.cm.tab10(i) for i, row in enumerate(rows_order)}
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    panels = summary["panels"]
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow + 0.6), squeeze=False)
    width = 0.8 / len(rows_order)
    for ax, m in zip(axes.flat, metrics):
        for pi, p in enumerate(panels):
            for ri, row in enumerate(rows_order):
                r = next((x for x in p["rows"] if x["row"] == row), None)
                st = r["metrics"].get(m) if r else None
                if st is None:
                    continue
                x = pi + (ri - (len(rows_order) - 1) / 2) * width
                ax.bar(x, st["mean"], width * 0.9, yerr=st["std"], color=colors[row], alpha=0.75, capsize=2,
                       label=row if pi == 0 else None, error_kw={"lw": 0.8})
                ax.scatter([x] * len(st["values"]), st["values"], s=6, color="k", zorder=3)
        ax.set_xticks(range(len(panels)))
        ax.set_xticklabels([_short_panel(p["panel"]) for p in panels], fontsize=7)
        if panels and "=" in panels[0]["panel"]:
            ax.set_xlabel(" / ".join(part.split("=", 1)[0] for part in panels[0]["panel"].split(", ")), fontsize=7)
        ax.set_title(m, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(rows_order), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) through points sorted by x (x inside their range)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"x={x} outside [{xs[0]}, {xs[-1]}]")


def is_curve(summary: dict) -> bool:
    """The panels are the values of one numeric knob (e.g. learning rates): an arm's points form a curve."""
    parts = [p["panel"].split(", ") for p in summary["panels"]]
    if len(parts) < 2 or any(len(x) != 1 or "=" not in x[0] for x in parts):
        return False
    keys = {x[0].split("=", 1)[0] for x in parts}
    try:
        [float(x[0].split("=", 1)[1]) for x in parts]
    except ValueError:
        return False
    return len(keys) == 1


def frontier_gap(summary: dict, x_metric: str, y_metric: str, reference: str, points: int = 5) -> list[dict]:
    """Each loss's y minus the reference's y at equal x (e.g. forgetting at equal new-task accuracy), seed
    by seed: per seed, each loss's panels (e.g. its learning rates) are joined into a piecewise-linear
    curve y(x); the two curves are compared at `points` x values spread over the x range that every
    seed's two curves cover. Paired over seeds like the tables (`paired_stats`): the warm start's
    spread cancels. Empty where the curves do not overlap or the panels are not one numeric knob's values
    (`is_curve`: points of different tasks are not a curve)."""
    if not is_curve(summary):
        return []
    per: dict = defaultdict(lambda: defaultdict(list))  # loss -> seed -> [(x, y)]
    for p in summary["panels"]:
        for r in p["rows"]:
            mx, my = r["metrics"].get(x_metric), r["metrics"].get(y_metric)
            if r["row"] == WARM or not mx or not my:
                continue
            ys = dict(zip(my["seeds"], my["values"]))
            for sd, xv in zip(mx["seeds"], mx["values"]):
                if sd in ys:
                    per[r["row"]][sd].append((xv, ys[sd]))
    out = []
    ref = per.get(reference, {})
    for loss, seeds in per.items():
        if loss == reference:
            continue
        common = [sd for sd in seeds if sd in ref and len(seeds[sd]) >= 2 and len(ref[sd]) >= 2]
        if len(common) < 2:
            continue
        curves = {sd: (sorted(seeds[sd]), sorted(ref[sd])) for sd in common}
        lo = max(max(c[0][0][0], c[1][0][0]) for c in curves.values())
        hi = min(min(c[0][-1][0], c[1][-1][0]) for c in curves.values())
        if not lo < hi:
            continue
        for i in range(points):
            x = lo + (hi - lo) * i / (points - 1)
            diffs = [_interp([a for a, _ in c[0]], [b for _, b in c[0]], x)
                     - _interp([a for a, _ in c[1]], [b for _, b in c[1]], x) for c in curves.values()]
            out.append({"loss": loss, "reference": reference, "x_metric": x_metric, "y_metric": y_metric, "x": x,
                        **paired_stats(diffs), "seeds": common, "values": diffs})
    return out


def frontier_markdown(gaps: list[dict]) -> str:
    if not gaps:
        return ""
    g0 = gaps[0]
    lines = ["", f"**Frontier**: {g0['y_metric']} of each loss minus {g0['reference']}'s at equal {g0['x_metric']} "
             f"(per seed, each loss's points joined piecewise-linearly; {PAIRED_LEGEND}):", "",
             f"| difference | at {g0['x_metric']} | n | {g0['y_metric']} |", "|---|---|---|---|"]
    for g in gaps:
        lines.append(f"| {g['loss']} - {g['reference']} | {g['x']:.3f} | {g['n']} | {fmt_paired(g)} |")
    return "\n".join(lines) + "\n"


def plot_frontier(summary: dict, x_metric: str, y_metric: str, path: str, losses: list[str]) -> str | None:
    """Trade-off view: every (panel, arm) as a point (mean, std error bars) of two metrics, so a
    loss can be compared with another at a matched value of one of them (e.g. a learning-rate sweep).
    Colour = arm, marker = panel; each arm's points are joined in order of x (its curve, e.g. over
    learning rates) and labelled with their panel's knob values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows_order = [WARM, *losses]
    colors = {row: plt.cm.tab10(i) for i, row in enumerate(rows_order)}
    markers = "osD^v<>PX*"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    used_rows, used_panels = [], []
    curve: dict = defaultdict(list)  # row -> [(x, y, panel label)]: each arm's points joined in x order
    for pi, p in enumerate(summary["panels"]):
        for row in rows_order:
            r = next((x for x in p["rows"] if x["row"] == row), None)
            if not r or x_metric not in r["metrics"] or y_metric not in r["metrics"]:
                continue
            sx, sy = r["metrics"][x_metric], r["metrics"][y_metric]
            ax.errorbar(sx["mean"], sy["mean"], xerr=sx["std"], yerr=sy["std"], fmt=markers[pi % len(markers)],
                        color=colors[row], ms=6, capsize=2, lw=0.8, alpha=0.85)
            used_rows += [row] if row not in used_rows else []
            used_panels += [pi] if pi not in used_panels else []
            curve[row].append((sx["mean"], sy["mean"], _short_panel(p["panel"]).replace("\n", ", ")))
    for row, pts in curve.items():
        pts.sort()
        if row == WARM:  # one point, repeated in every panel: not labelled
            continue
        if len(pts) > 1 and is_curve(summary):
            ax.plot([a for a, _, _ in pts], [b for _, b, _ in pts], color=colors[row], lw=1, alpha=0.6)
        for a, b, lab in pts:
            ax.annotate(lab, (a, b), fontsize=6, xytext=(3, 3), textcoords="offset points", color=colors[row])
    if not used_rows:
        plt.close(fig)
        return None
    handles = [Line2D([], [], color=colors[r], marker="o", ls="", label=r) for r in rows_order if r in used_rows]
    handles += [Line2D([], [], color="gray", marker=markers[pi % len(markers)], ls="",
                       label=summary["panels"][pi]["panel"]) for pi in used_panels]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel(x_metric)
    ax.set_ylabel(y_metric)
    ax.set_title(f"{y_metric} vs {x_metric} (mean ± std over seeds; colour = arm, marker = panel)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
