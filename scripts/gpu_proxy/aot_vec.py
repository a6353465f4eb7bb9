#!/usr/bin/env python
"""Compile the Triton backend's kernels for sm_90 on CPU, the way triton_aot does (no argument
attributes) and the way the JIT would specialise them at run time on a GPU (pointers and ints that
are multiples of 16 carry tt.divisibility=16), and compare registers, spills and the width of the
global loads/stores in the PTX.

    TRITON_INTERPRET=0 python aot_vec.py CHECKOUT [--only stats,grad,sampler] [--ragged]

--ragged also compiles a run-time variant where n_real is NOT a multiple of 16 (e.g. a real
vocabulary of 50257 on the last TP rank) to show what the `offs < n_real` masks do to vectorisation.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("checkout")
    p.add_argument("--only", default="")
    p.add_argument("--ragged", action="store_true")
    p.add_argument("--max", type=int, default=99)
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.checkout))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from otr_megatron.core import triton_aot as aot

    target = GPUTarget("cuda", 90, 32)
    rows = []
    picked = aot.variants()
    if a.only:
        keys = a.only.split(",")
        picked = [v for v in picked if any(v[0].startswith(k) for k in keys)]
    picked = picked[: a.max]
    for label, kernel, types, const, warps, d16, opts in picked:
        sig = aot._sig(kernel, types, const)
        modes = [("aot (no attrs)", {})]
        # the variant's own run-time specialisation (ints whose values are multiples of 16)
        attrs = aot.attrs_for(kernel, sig, const, d16)
        modes.append(("runtime (div16)", attrs))
        if a.ragged and "n_real" in kernel.arg_names:
            i = kernel.arg_names.index("n_real")
            modes.append(("runtime, n_real%16!=0", {k: v for k, v in attrs.items() if k != (i,)}))
        for mode, at in modes:
            t0 = time.perf_counter()
            c = triton.compile(ASTSource(kernel, sig, const, at), target=target, options=opts)
            sec = time.perf_counter() - t0
            ptx = c.asm["ptx"]
            res = aot._resources(ptx, 90)
            ld = re.findall(r"ld\.global(?:\.[a-zA-Z0-9_:]+)*?\.(v[248])?\.?([bfsu]\d+)", ptx)
            lds = {}
            for line in ptx.splitlines():
                m = re.search(r"\b(ld|st)\.global\S*", line)
                if m:
                    tok = m.group(0)
                    vec = re.search(r"\.(v[248])\.", tok)
                    w = re.search(r"\.([bfsu](8|16|32|64))\b", tok)
                    key = f"{m.group(1)}.{vec.group(1) if vec else 'v1'}.{w.group(1) if w else '?'}"
                    lds[key] = lds.get(key, 0) + 1
            smem = c.metadata.shared if hasattr(c.metadata, "shared") else None
            row = dict(variant=label, mode=mode, seconds=round(sec, 1), **{**res, "smem": smem},
                       mem_instrs=dict(sorted(lds.items())))
            rows.append(row)
            print(f"{label:<52} {mode:<22} regs={res['regs']:>3} spill={res['spill_stores']:>3}/{res['spill_loads']:<3}"
                  f" stack={res['stack']:>3} smem={smem} {sec:5.1f}s  {row['mem_instrs']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
