#!/usr/bin/env python
"""Order of global loads/stores and barriers in the sm_90 PTX of the grad kernel (in-place safety:
the sparse logits must be loaded before the first bar.sync, the sparse stores after the last) and
of the stats kernel's epilogue (packed pairs stored before the barrier, re-read after it).
    TRITON_INTERPRET=0 python ptx_order.py CHECKOUT"""
import os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.abspath(sys.argv[1]))
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from otr_megatron.core import triton_aot as aot
want = sys.argv[2:] or ["grad sample bf16 V/tp=131072 tp=1 K=256 B=16 S=256 local", "stats sample bf16 V/tp=131072"]
for label, kernel, types, const, warps, div16, opts in aot.variants():
    if not any(label.startswith(w) for w in want):
        continue
    sig = aot._sig(kernel, types, const)
    attrs = aot.attrs_for(kernel, sig, const, div16)  # the variant's run-time specialisation
    c = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    seq = []
    for line in c.asm["ptx"].splitlines():
        s = line.strip()
        m = re.search(r"\b(ld\.global\S*|st\.global\S*|bar\.sync|barrier\.sync|bra\S*|\$L__BB\d+_\d+:)", s)
        if m:
            tok = m.group(1)
            seq.append(tok if not tok.startswith("bra") else "bra " + s.split()[-1].rstrip(";"))
    # compress runs
    out, prev, n = [], None, 0
    for t in seq:
        if t == prev:
            n += 1
        else:
            if prev is not None:
                out.append(f"{prev} x{n}" if n > 1 else prev)
            prev, n = t, 1
    out.append(f"{prev} x{n}" if n > 1 else prev)
    print(f"\n{label}:\n  " + "\n  ".join(out))
