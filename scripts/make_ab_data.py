#!/usr/bin/env python
"""Write the A/B studies' data (``assets:ab_*.jsonl``, used by `otr-megatron compare`) to a directory.

Nothing needs this to run the study: the package generates the files on first use; the tasks and
splits are described in `otr_megatron.data.synthetic`. It is for reading them, copying them
elsewhere, or making a variant with another seed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_demo_data import write  # noqa: E402  (one writer for both scripts)

from otr_megatron.data import synthetic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default: the assets: cache)")
    ap.add_argument("--seed", type=int, default=synthetic.AB_SEED)
    args = ap.parse_args(argv)
    splits = {**synthetic.ab_splits(args.seed),
              **synthetic.forms_splits(args.seed - synthetic.AB_SEED + synthetic.FORMS_SEED, args.seed)}
    write(args.out, splits, synthetic.AB_PREFIX, args.seed, synthetic.AB_SEED)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
