#!/usr/bin/env python
"""Generate the demo SFT dataset shipped in otr_megatron/data/assets/ (deterministic, seeded).

Task: string transformations a tiny byte-level GPT learns on two CPU cores in minutes.

    prompt  "rev:kqzma="   response "amzqk"     (reverse)
    prompt  "up:kqzma="    response "KQZMA"     (upper-case)
    prompt  "rot:kqzma="   response "lranb"     (shift each letter by one, z -> a)

Splits (JSONL, {"prompt", "response"} per line):

* ``pretrain.jsonl``  words of 3-8 letters: the cross-entropy warm start that gives OTR a base
  distribution to work from (OTR's signal scales with p(label)).
* ``train.jsonl``     words of 3-8 letters, disjoint from every other split: the fine-tuning data.
* ``eval_id.jsonl``   in-domain evaluation: same distribution, unseen words.
* ``eval_ood.jsonl``  out-of-domain evaluation: words of 9-12 letters, longer than anything trained.

Metric: exact match of the answer, computed under teacher forcing as "every response token (and
the closing EOS) is the argmax": that is exactly when greedy decoding reproduces the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string

OPS = {
    "rev": lambda w: w[::-1],
    "up": lambda w: w.upper(),
    "rot": lambda w: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w),
}

SPLITS = {
    # name: (count, min_len, max_len)
    "pretrain": (3000, 3, 8),
    "train": (4000, 3, 8),
    "eval_id": (400, 3, 8),
    "eval_ood": (400, 9, 12),
}


def make_splits(seed: int = 20250930) -> dict[str, list[dict]]:
    """All splits; a (op, word) pair appears in at most one split."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[dict]] = {}
    # Evaluation splits first so their items are never taken by the (larger) training splits.
    for name in ("eval_id", "eval_ood", "train", "pretrain"):
        count, lo, hi = SPLITS[name]
        out[name] = string_rows(rng, seen, count, lo, hi)
    return out


def string_rows(rng: random.Random, seen: set, count: int, lo: int, hi: int, accept=None) -> list[dict]:
    """`count` new (op, word) records, words of lo..hi letters; `accept(op, word)` filters (no RNG use)."""
    rows = []
    while len(rows) < count:
        op = rng.choice(sorted(OPS))
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))
        if accept is not None and not accept(op, word):
            continue
        if (op, word) in seen:
            continue
        seen.add((op, word))
        rows.append({"prompt": f"{op}:{word}=", "response": OPS[op](word)})
    return rows


ASSETS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "otr_megatron",
                                       "data", "assets"))


def write_splits(out_dir: str, splits: dict[str, list[dict]], prefix: str = "") -> None:
    """Write each split to ``out_dir/<prefix><name>.jsonl``: compact JSON lines, LF, byte-stable."""
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        path = os.path.join(out_dir, f"{prefix}{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        print(f"wrote {len(rows):5d} records to {path} ({os.path.getsize(path)} bytes)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=ASSETS, help="output directory")
    ap.add_argument("--seed", type=int, default=20250930)
    args = ap.parse_args(argv)
    write_splits(args.out, make_splits(args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
