"""PNG of the training curves from metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, png_path: str, pretrain_iters: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    splits = sorted({k.split("/")[0] for r in evals for k in r if "/" in k})

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    # "lm loss" is the label cross entropy in every stage; "otr loss" is what was backpropagated
    # (equal to the CE in the CE stage; the OTR surrogate, near zero, during OTR)
    for key, label in (("lm_loss", "label CE (lm loss)"), ("otr_loss", "backpropagated loss (otr loss)")):
        pts = [(r["iteration"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, label=label)
    hits = [(r["iteration"], r["otr_hit_rate"]) for r in train if "otr_hit_rate" in r]
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (per token)")
    if hits:
        ax2 = ax.twinx()
        ax2.plot(*zip(*hits), color="tab:green", lw=0.8, label="OTR hit rate")
        ax2.set_ylabel("OTR hit rate")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("training")
    for i, (metric, title) in enumerate((("exact_match", "exact match (greedy answer)"), ("ce", "eval CE (response tokens)"))):
        ax = axes[i + 1]
        for s in splits:
            pts = [(r["iteration"], r[f"{s}/{metric}"]) for r in evals if f"{s}/{metric}" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=s)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        if 0 < pretrain_iters:
            ax.axvline(pretrain_iters, color="gray", ls="--", lw=0.8)
    fig.suptitle("otr-megatron train (dashed line: end of CE pretraining, start of fine-tuning)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
