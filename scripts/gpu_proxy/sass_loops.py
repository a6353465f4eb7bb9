#!/usr/bin/env python
"""Instruction mix of the Triton backend's loops in sm_90 SASS, compiled on CPU with the run-time
specialisation (pointers and multiple-of-16 ints carry tt.divisibility=16), disassembled with the
nvdisasm that Triton bundles. For each loop (a backward branch), the static instruction count
of its body and of its MUFU (ex2/rcp), FP64 (D*), global load/store, shared-memory and barrier
instructions; divided by the elements each thread handles per iteration this gives warp-issue
slots per logit element, to compare with the ~128 thread-instructions/clock/SM an H100 issues.

    TRITON_INTERPRET=0 python sass_loops.py CHECKOUT [--only "stats sample bf16 V/tp=131072"]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"


def loops(sass: str):
    lines = [l for l in sass.splitlines()]
    label_at = {}
    instrs = []  # (index, text)
    for l in lines:
        m = re.match(r"\s*(\.L_x_\d+):", l)
        if m:
            label_at[m.group(1)] = len(instrs)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", l)
        if m:
            instrs.append(m.group(1).strip())
    out = []
    for i, ins in enumerate(instrs):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", ins)
        if m and m.group(1) in label_at and label_at[m.group(1)] <= i:
            body = instrs[label_at[m.group(1)]: i + 1]
            out.append((label_at[m.group(1)], i, body))
    return out, instrs


def mix(body):
    def cnt(pat):
        return sum(1 for b in body if re.search(pat, b))
    return dict(n=len(body), mufu=cnt(r"\bMUFU\."), fp64=cnt(r"\bD(FMA|ADD|MUL|SETP|MNMX)\b"),
                ldg=cnt(r"\bLDG\."), stg=cnt(r"\bSTG\."), sh=cnt(r"\b(LDS|STS)\b"), bar=cnt(r"\bBAR\."),
                shfl=cnt(r"\bSHFL\."))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("checkout")
    p.add_argument("--only", default="stats,grad,sampler")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.checkout))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from otr_megatron.core import triton_aot as aot

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    keys = a.only.split(",")
    for label, kernel, types, const, warps, d16, opts in aot.variants():
        if not any(label.startswith(k) for k in keys):
            continue
        sig = aot._sig(kernel, types, const)
        # the variant's own run-time specialisation (ints by value: divisible by 16, or 1 as a constexpr)
        attrs = aot.attrs_for(kernel, sig, const, d16)
        c = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options=opts)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "k.cubin")
            open(f, "wb").write(c.asm["cubin"])
            sass = subprocess.run([tool, "-c", f], capture_output=True, text=True, check=True).stdout
        lps, allins = loops(sass)
        tile = const.get("TILE")
        threads = 32 * warps
        print(f"\n{label}  (num_warps={warps}, TILE={tile}, KC={const.get('KC')}, total SASS {len(allins)})")
        tot = mix(allins)
        print(f"  whole kernel: {tot}")
        for start, end, body in lps:
            m = mix(body)
            per = f", per element {m['n'] / (tile / threads):.2f} instr" if tile else ""
            print(f"  loop [{start}:{end}] {m}{per}")


if __name__ == "__main__":
    main()
