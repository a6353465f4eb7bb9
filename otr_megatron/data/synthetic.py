"""The synthetic SFT data behind ``assets:NAME``: the demo job's and the A/B study's.

The files are a pure function of this module (seeded `random.Random`, no network, no numpy), so
the package carries the generator rather than 1.2 MB of generated lines; `otr_megatron.data.assets`
writes them into a cache on first use. A change to anything below that changes a single byte must
bump `GENERATOR_VERSION` (the cache key) and the checksums pinned in ``tests/data/test_synthetic.py``,
which are those of the files the shipped study (``docs/compare_ab_results.json``) was run on.

**Demo** (`otr-megatron train`): string transformations a tiny byte-level GPT learns on two CPU
cores in minutes.

    prompt  "rev:kqzma="   response "amzqk"     (reverse)
    prompt  "up:kqzma="    response "KQZMA"     (upper-case)
    prompt  "rot:kqzma="   response "lranb"     (shift each letter by one, z -> a)

* ``pretrain.jsonl``  words of 3-8 letters: the cross-entropy warm start that gives OTR a base
  distribution to work from (OTR's signal scales with p(label)).
* ``train.jsonl``     words of 3-8 letters, disjoint from every other split: the fine-tuning data.
* ``eval_id.jsonl``   in-domain evaluation: same distribution, unseen words.
* ``eval_ood.jsonl``  out-of-domain evaluation: words of 9-12 letters, longer than anything trained.

Metric: exact match of the answer, computed under teacher forcing as "every response token (and
the closing EOS) is the argmax": that is exactly when greedy decoding reproduces the answer.

**A/B study** (`otr-megatron compare`, files ``ab_*.jsonl``). One cross-entropy warm start learns:

* the **old task**, the demo's string transformations, words of 3-8 letters;
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

**Surface forms** (files ``ab_forms_*.jsonl``, `otr-megatron compare --config configs/compare_forms.yaml`):
many valid answers as real SFT data has them, several equivalent ways to write one answer, with the
choices spread over the response rather than at one token. Prompt ``N:<n>=`` (n of 4-5 digits); an
answer is n with a unit, in one of 8 forms: word order (number first or unit first) x synonym
(``pts`` / ``points``) x number format (``12345`` / ``12,345``), e.g. ``12345 pts``, ``points 12,345``.
The warm start (``ab_forms_pretrain``: the old task, the parity prior and this one) answers with the
canonical form ``12345 pts`` half of the time and a uniformly random form otherwise (the base puts ~0.56
on it). Fine-tuning: ``ab_forms_fixed`` (always the canonical form: one correct answer, the null
control) or ``ab_forms_many`` (a uniformly random form per record). ``ab_forms_eval``: unseen numbers,
canonical form (the job's exact match there is "greedy gives the canonical form"; the harness's
``number_forms`` answer rule scores the probability of all 8 forms).
"""

from __future__ import annotations

import json
import random
import string

GENERATOR_VERSION = 1
DEMO_SEED = 20250930
AB_SEED = 20260930
AB_PREFIX = "ab_"

OPS = {
    "rev": lambda w: w[::-1],
    "up": lambda w: w.upper(),
    "rot": lambda w: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w),
}

DEMO_SPLITS = {  # name: (count, min_len, max_len)
    "pretrain": (3000, 3, 8),
    "train": (4000, 3, 8),
    "eval_id": (400, 3, 8),
    "eval_ood": (400, 9, 12),
}

PRIOR_LAST_DIGIT = 0.5  # share of warm-start answers that are n's last digit (else a uniform digit)
# Old task, in domain: words of 3-8 letters, but each operation never sees words starting with its
# own held-out letters (other operations do). Out of domain (``strings_ood``): exactly those
# held-out (operation, first letter) combinations. Words of 9+ letters (``strings_long``, beyond
# every length trained) are kept as a second, harder split: this model stays at exact match 0 there.
HELD_OUT_FIRST = {"rev": "abcd", "up": "efgh", "rot": "ijkl"}
AB_STRING_SPLITS = {  # name: (count, min_len, max_len, first letter held out (False) or required (True))
    "strings_eval": (400, 3, 8, False),
    "strings_ood": (400, 3, 8, True),
    "strings_long": (400, 9, 10, False),
    "strings_train": (4000, 3, 8, False),
    "strings_pretrain": (4000, 3, 8, False),
}
AB_PARITY_SPLITS = {"parity_eval": 400, "parity_train": 4000, "parity_pretrain": 3000}
# The A/B files (without prefix), known without generating them, for `ASSET_NAMES`.
AB_FILES = ("pretrain", "strings_train", "strings_eval", "strings_ood", "strings_long", "parity_fixed",
            "parity_uniform", "parity_eval")

# Surface-forms task (a second random stream, so the files above keep their bytes).
FORMS_SEED = AB_SEED + 1
FORMS_UNITS = ("pts", "points")
FORMS_PRIOR_CANONICAL = 0.5  # share of warm-start answers in the canonical form (else a uniform form)
FORMS_SPLITS = {"forms_eval": 400, "forms_train": 4000, "forms_pretrain": 3000}
FORMS_FILES = ("forms_pretrain", "forms_fixed", "forms_many", "forms_eval")

ASSET_NAMES = tuple(sorted([f"{n}.jsonl" for n in DEMO_SPLITS] + [f"{AB_PREFIX}{n}.jsonl" for n in AB_FILES]
                           + [f"{AB_PREFIX}{n}.jsonl" for n in FORMS_FILES]))


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


def demo_splits(seed: int = DEMO_SEED) -> dict[str, list[dict]]:
    """The demo's splits; a (op, word) pair appears in at most one split."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out: dict[str, list[dict]] = {}
    # Evaluation splits first so their items are never taken by the (larger) training splits.
    for name in ("eval_id", "eval_ood", "train", "pretrain"):
        count, lo, hi = DEMO_SPLITS[name]
        out[name] = string_rows(rng, seen, count, lo, hi)
    return out


def valid_digits(n: int) -> list[str]:
    """The five digits with n's parity: the correct answers to ``P:<n>=``."""
    return [str(d) for d in range(n % 2, 10, 2)]


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


def ab_splits(seed: int = AB_SEED) -> dict[str, list[dict]]:
    """The A/B study's splits (names without the ``ab_`` prefix), in `AB_FILES` order."""
    rng = random.Random(seed)
    seen_words: set[tuple[str, str]] = set()
    strings = {
        name: string_rows(rng, seen_words, count, lo, hi,
                          accept=lambda op, word, h=held_out: (word[0] in HELD_OUT_FIRST[op]) == h)
        for name, (count, lo, hi, held_out) in AB_STRING_SPLITS.items()
    }
    seen_numbers: set[int] = set()
    nums = {name: _numbers(rng, seen_numbers, count) for name, count in AB_PARITY_SPLITS.items()}

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


def number_forms(n: int) -> list[str]:
    """The 8 equivalent answers to ``N:<n>=``, the canonical one (``12345 pts``) first."""
    out = []
    for number in (str(n), f"{n:,}"):
        for unit in FORMS_UNITS:
            out += [f"{number} {unit}", f"{unit} {number}"]
    return out


def forms_splits(seed: int = FORMS_SEED, ab_seed: int = AB_SEED) -> dict[str, list[dict]]:
    """The surface-forms files (names without the ``ab_`` prefix), in `FORMS_FILES` order; the warm
    start holds the A/B study's (made with `ab_seed`) plus the forms prior."""
    rng = random.Random(seed)
    seen: set[int] = set()
    nums = {}
    for name, count in FORMS_SPLITS.items():
        nums[name] = []
        while len(nums[name]) < count:
            n = rng.randint(1000, 99999)
            if n not in seen:
                seen.add(n)
                nums[name].append(n)

    def prior(n: int) -> str:
        forms = number_forms(n)
        return forms[0] if rng.random() < FORMS_PRIOR_CANONICAL else rng.choice(forms)

    pretrain = ab_splits(ab_seed)["pretrain"] + [{"prompt": f"N:{n}=", "response": prior(n)} for n in nums["forms_pretrain"]]
    rng.shuffle(pretrain)
    return {
        "forms_pretrain": pretrain,
        "forms_fixed": [{"prompt": f"N:{n}=", "response": number_forms(n)[0]} for n in nums["forms_train"]],
        "forms_many": [{"prompt": f"N:{n}=", "response": rng.choice(number_forms(n))} for n in nums["forms_train"]],
        "forms_eval": [{"prompt": f"N:{n}=", "response": number_forms(n)[0]} for n in nums["forms_eval"]],
    }


def jsonl_bytes(rows: list[dict]) -> bytes:
    """Compact JSON lines, ASCII, LF: the same bytes on every platform (the checksums depend on it)."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")


def asset_files() -> dict[str, bytes]:
    """Every ``assets:`` file, name -> content (0.3 s: cheap enough to make all of them at once)."""
    files = {f"{name}.jsonl": jsonl_bytes(rows) for name, rows in demo_splits().items()}
    files.update({f"{AB_PREFIX}{name}.jsonl": jsonl_bytes(rows) for name, rows in ab_splits().items()})
    files.update({f"{AB_PREFIX}{name}.jsonl": jsonl_bytes(rows) for name, rows in forms_splits().items()})
    assert tuple(sorted(files)) == ASSET_NAMES, "ASSET_NAMES is out of step with the generators"
    return files
