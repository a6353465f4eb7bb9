#!/usr/bin/env python
"""Generate the A/B study data shipped as otr_megatron/data/assets/ab_*.jsonl (deterministic, seeded).

Used by `otr-megatron compare` (the default study). One cross-entropy warm start learns two things:

* the **old task**, string transformations as in `make_demo_data.py` (``rev:kqzma=`` -> ``amzqk``,
  ``up:`` upper-case, ``rot:`` shift by one), words of 3-8 letters;
* an idiosyncratic **prior** for new-task prompts ``P:<n>=``: the answer is n's last digit half
  of the time and a uniformly random digit otherwise (so the base model puts ~0.55 on the last
  digit and ~0.05 on every other digit).

Fine-tuning then trains one of three tasks from that same warm start:

* ``ab_parity_fixed``   new task, one fixed label per prompt: n's last digit (the base's mode,
  which always has n's parity). A single correct answer: every loss has the same optimum, a
  one-hot on the label. Null control.
* ``ab_parity_uniform`` new task, the same prompts, label drawn uniformly from the five digits with
  n's parity. Many correct answers: cross entropy's optimum is the uniform over them (away from the
  base's preference); a reward-weighted objective (OTR, DFT) is satisfied by any distribution on the
  valid digits, so it is predicted to stay closer to the base model and to forget less.
* ``ab_strings_train``  more of the old task (the original demo's fine-tuning), for the
  in-domain / out-of-domain comparison.

Evaluation splits: ``ab_strings_eval`` (old task, unseen words: retention), ``ab_strings_ood``
(held-out combinations: each operation on words starting with letters it never saw first, though
the other operations did: rev a-d, up e-h, rot i-l), ``ab_strings_long`` (9-10 letters, beyond every
length trained: a harder split where this tiny model stays at exact match 0),
``ab_parity_eval`` (unseen numbers; response = last digit, so the job's own exact match there is
"greedy answer = last digit"; the harness measures parity accuracy and KL from the distributions).
Every (op, word) and every n is in at most one split.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_demo_data import ASSETS, string_rows, write_splits  # noqa: E402  (the old task's rows, one writer)

PREFIX = "ab_"
PRIOR_LAST_DIGIT = 0.5  # share of warm-start answers that are n's last digit (else a uniform digit)

# Old task, in domain: words of 3-8 letters, but each operation never sees words starting with its
# own held-out letters (other operations do). Out of domain (``strings_ood``): exactly those
# held-out (operation, first letter) combinations. Words of 9+ letters (``strings_long``, beyond
# every length trained) are kept as a second, harder split: this model stays at exact match 0 there.
HELD_OUT_FIRST = {"rev": "abcd", "up": "efgh", "rot": "ijkl"}
STRING_SPLITS = {  # name: (count, min_len, max_len, first letter held out (False) or required (True))
    "strings_eval": (400, 3, 8, False),
    "strings_ood": (400, 3, 8, True),
    "strings_long": (400, 9, 10, False),
    "strings_train": (4000, 3, 8, False),
    "strings_pretrain": (4000, 3, 8, False),
}
PARITY_SPLITS = {"parity_eval": 400, "parity_train": 4000, "parity_pretrain": 3000}


def valid_digits(n: int) -> list[str]:
    """The five digits with n's parity: the correct answers to ``P:<n>=``."""
    return [str(d) for d in range(n % 2, 10, 2)]


def _string_rows(rng: random.Random, seen: set) -> dict[str, list[dict]]:
    out = {}
    for name, (count, lo, hi, held_out) in STRING_SPLITS.items():
        out[name] = string_rows(rng, seen, count, lo, hi,
                                accept=lambda op, word, h=held_out: (word[0] in HELD_OUT_FIRST[op]) == h)
    return out


def _numbers(rng: random.Random, seen: set, count: int) -> list[int]:
    """Distinct numbers with 2 to 5 digits (digit count uniform), never reused across splits."""
    out = []
    while len(out) < count:
        k = rng.randint(2, 5)
        n = rng.randint(10 ** (k - 1), 10**k - 1)
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
    return out


def make_splits(seed: int = 20260930) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    strings = _string_rows(rng, set())
    seen: set[int] = set()
    nums = {name: _numbers(rng, seen, count) for name, count in PARITY_SPLITS.items()}

    def prior(n: int) -> str:
        return str(n % 10) if rng.random() < PRIOR_LAST_DIGIT else str(rng.randrange(10))

    pretrain = strings["strings_pretrain"] + [{"prompt": f"P:{n}=", "response": prior(n)} for n in nums["parity_pretrain"]]
    rng.shuffle(pretrain)
    return {
        "pretrain": pretrain,
        "strings_train": strings["strings_train"],
        "strings_eval": strings["strings_eval"],
        "strings_ood": strings["strings_ood"],
        "strings_long": strings["strings_long"],
        "parity_fixed": [{"prompt": f"P:{n}=", "response": str(n % 10)} for n in nums["parity_train"]],
        "parity_uniform": [{"prompt": f"P:{n}=", "response": rng.choice(valid_digits(n))} for n in nums["parity_train"]],
        "parity_eval": [{"prompt": f"P:{n}=", "response": str(n % 10)} for n in nums["parity_eval"]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=ASSETS, help="output directory")
    ap.add_argument("--seed", type=int, default=20260930)
    args = ap.parse_args(argv)
    write_splits(args.out, make_splits(args.seed), prefix=PREFIX)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
