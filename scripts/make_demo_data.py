#!/usr/bin/env python
"""Write the demo job's data (``assets:pretrain.jsonl``, ``train``, ``eval_id``, ``eval_ood``) to a directory.

Nothing needs this to train: the package generates the files on first use
(`otr_megatron.data.synthetic`, cached by `otr_megatron.data.assets`). It is for reading them,
copying them elsewhere, or making a variant with another seed.
"""

from __future__ import annotations

import argparse
import os

from otr_megatron.data import synthetic
from otr_megatron.data.assets import ensure_assets


def write(out: str | None, splits: dict[str, list[dict]], prefix: str, seed: int, default_seed: int) -> None:
    """`out` None: make sure the cache holds the files and print where; else write these splits there."""
    if out is None:
        if seed != default_seed:
            raise SystemExit("--seed needs --out: the cache holds the default-seed files that assets: names mean")
        d = ensure_assets()
        names = [f"{prefix}{name}.jsonl" for name in splits]
    else:
        os.makedirs(out, exist_ok=True)
        d, names = out, []
        for name, rows in splits.items():
            names.append(f"{prefix}{name}.jsonl")
            with open(os.path.join(out, names[-1]), "wb") as f:
                f.write(synthetic.jsonl_bytes(rows))
    for n in names:
        path = os.path.join(d, n)
        print(f"{path} ({os.path.getsize(path)} bytes)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default: the assets: cache)")
    ap.add_argument("--seed", type=int, default=synthetic.DEMO_SEED)
    args = ap.parse_args(argv)
    write(args.out, synthetic.demo_splits(args.seed), "", args.seed, synthetic.DEMO_SEED)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
