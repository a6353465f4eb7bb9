#!/usr/bin/env python
"""Print the README's study tables ("Does OTR help?") from the studies' per-seed JSON.

    python scripts/study_tables.py map docs/study/map_results.json
    python scripts/study_tables.py frontier docs/study/frontier_results.json
    python scripts/study_tables.py forms docs/study/forms_results.json

Every cell is a paired difference against SFT on the same seeds and warm starts: mean [95% t-interval],
bold where the interval excludes 0 (otr_megatron.compare.report.paired_stats).
"""

from __future__ import annotations

import json
import sys

from otr_megatron.compare.report import frontier_gap


def cell(st: dict | None) -> str:
    if st is None:
        return "-"
    lo, hi = st["ci95"]
    text = f"{st['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return f"**{text}**" if st["shown"] else text


def paired(summary: dict, panel: str, row: str, metric: str) -> dict | None:
    for p in summary["panels"]:
        if p["panel"] == panel:
            for r in p["paired"]:
                if r["row"] == f"{row} - sft" and metric in r["metrics"]:
                    return r["metrics"][metric]
    return None


def map_table(s: dict) -> str:
    many, null = "train=ab_parity_uniform", "train=ab_parity_fixed"
    settings = [("", "K=32, kappa=1.3, beta=-0.1 (default)")]
    settings += [(f", num_samples={k}", f"K={k}") for k in (1, 4, 256)]
    settings += [(f", temperature={t}", f"kappa={t}") for t in ("0.7", "1.0", "2.0")]
    settings += [(f", neg_reward={b}", f"beta={b}") for b in ("0", "-0.05", "-0.3", "-1")]
    out = ["| setting | loss | old-task CE | old-task KL(base ‖ tuned) | P(base's answer) | new-task P(correct) | "
           "null control: old-task CE | null control: P(correct) |", "|---|---|---|---|---|---|---|---|"]
    out.append(f"| - | dft | {cell(paired(s, many, 'dft', 'old/ce'))} | {cell(paired(s, many, 'dft', 'old/kl_response'))} | "
               f"{cell(paired(s, many, 'dft', 'parity/base_mode_mass'))} | {cell(paired(s, many, 'dft', 'parity/valid_mass'))} | "
               f"{cell(paired(s, null, 'dft', 'old/ce'))} | {cell(paired(s, null, 'dft', 'parity/valid_mass'))} |")
    for suffix, label in settings:
        losses = ("otr", "otr-expected") if "num_samples" not in suffix else ("otr",)
        for loss in losses:
            out.append(f"| {label} | {loss} | " + " | ".join(cell(paired(s, p + suffix, loss, m)) for p, m in (
                (many, "old/ce"), (many, "old/kl_response"), (many, "parity/base_mode_mass"), (many, "parity/valid_mass"),
                (null, "old/ce"), (null, "parity/valid_mass"))) + " |")
    return "\n".join(out)


def frontier_table(s: dict, x: str = "parity/valid_mass", y: str = "old/ce") -> str:
    out = [f"| {y}, at equal {x} | point 1 (low) | point 2 | point 3 | point 4 | point 5 (high) |",
           "|---|---|---|---|---|---|"]
    for ref, loss in (("sft", "otr"), ("sft", "dft"), ("otr", "dft")):
        gaps = [g for g in frontier_gap(s, x, y, ref) if g["loss"] == loss]
        out.append(f"| {y}: {loss} - {ref} | " + " | ".join(f"{cell(g)} (at {g['x']:.3f})" for g in gaps) + " |")
    return "\n".join(out)


def forms_table(s: dict) -> str:
    metrics = ("forms/valid_mass", "forms/base_mode_mass", "forms/exact_match", "old/ce", "old/kl_response")
    out = ["| task | loss - sft | P(correct form) | P(base's form) | greedy = canonical form | old-task CE | "
           "old-task KL |", "|---|---|---|---|---|---|---|"]
    for panel, task in (("train=ab_forms_fixed", "single form (null)"), ("train=ab_forms_many", "8 forms")):
        for loss in ("dft", "otr-expected", "otr"):
            out.append(f"| {task} | {loss} | " + " | ".join(cell(paired(s, panel, loss, m)) for m in metrics) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("map", "frontier", "forms"):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        s = json.load(f)
    print({"map": map_table, "frontier": frontier_table, "forms": forms_table}[argv[0]](s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
