"""Ahead-of-time compilation of the Triton backend's kernels for a GPU architecture, on a machine
without a GPU: catches what the interpreter cannot (code the compiler rejects, register spills).

    TRITON_INTERPRET=0 python -m otr_megatron.core.triton_aot [--arch 90]

Compiles the variants the backend launches at the benchmark's sizes (bf16/fp16/fp32 inputs, every
estimator, K = 8 and 256, and a ragged real vocabulary: the last TP rank of 151665 ids) with the
run-time specialisation the JIT applies (pointers and the ints whose values there are multiples of
16 carry divisibility 16, ints equal to 1 are constants) and the launch options of the params
(num_warps, maxnreg), so what is reported is what runs, to cubin with Triton's bundled LLVM and
ptxas, and reads each kernel's registers, stack and local memory (spills) from ptxas's report.
Needs TRITON_INTERPRET unset or 0 before `triton_backend` is imported (the interpreter replaces the
kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# no launched variant may spill
MAX_SPILL_BYTES = 0


def _sig(kernel, types: dict, constexprs: dict) -> dict:
    """Triton signature: pointer/int types by name, everything in `constexprs` as constexpr."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:  # strides, sizes and scalar ints
            sig[name] = "i64" if name == "key_mix" else "i32"
    return sig


_LAUNCH_OPTIONS = ("maxnreg",)  # launch options a params dict may hold besides num_warps


def _options(warps: int, const: dict) -> dict:
    """The compile options of a launch (num_warps, and those popped from the params dict `const`)."""
    return {"num_warps": warps, **{k: const.pop(k) for k in _LAUNCH_OPTIONS if k in const}}


def _specialise(const: dict, values: dict):
    """The JIT's specialisation of int arguments by value (triton 3.x): 1 becomes the constexpr 1, a
    multiple of 16 (0 included) gets tt.divisibility 16. Returns (constexprs with the ones, div16)."""
    ones = {name: 1 for name, v in values.items() if v == 1}
    return {**const, **ones}, {name for name, v in values.items() if v % 16 == 0}


def variants():
    """(label, kernel, pointer types, constexprs, num_warps, div16, options) exactly as the wrappers launch them
    on a GPU at N x V/tp = 8192 x {131072, 32768, 16384} (their `*_params` functions, interpret=False), with
    the JIT's run-time specialisation: pointers carry tt.divisibility 16, and so does every int argument
    whose value there is a multiple of 16 (`div16`), ints equal to 1 are constexprs; both from the values
    the wrappers pass (the strides of the contiguous buffers `core/loss.py` allocates, the spec's sizes)."""
    from otr_megatron.core import triton_backend as trb
    from otr_megatron.core.contract import Spec, block_size, stat_columns

    out = []
    cases = (("bf16", "sample", 131072, 256, 1, 0, False), ("bf16", "sample", 16384, 256, 8, 3, False),
             ("bf16", "sample", 16384, 8, 8, 3, False), ("fp32", "sample", 16384, 256, 1, 0, False),
             # the proxies' byte count (count_bytes.py): V = 32768 at tp=1, 8 tiles, pairs in registers
             ("bf16", "sample", 32768, 256, 1, 0, False),
             ("bf16", "expected", 131072, 1, 1, 0, False), ("fp16", "sft", 16384, 1, 1, 0, False),
             # the last TP rank of a 151665-id vocabulary padded to 152064 (tp=8): n_real = 18657
             ("bf16", "sample", 19008, 256, 8, 7, True), ("bf16", "expected", 19008, 1, 8, 7, True))
    names = {f.name for f in dataclasses.fields(Spec)}
    for dt, est, shard, k, tp, rank, ragged in cases:
        vocab = 151665 if ragged else shard * tp
        b = block_size(vocab, k, shard) if est == "sample" else 1
        n_real = min(max(vocab - rank * shard, 0), shard)
        fields = dict(estimator=est, kappa=1.3, beta=-0.1, k=k, seed=1234, step=0, rank=rank, world=tp, shard=shard,
                      n_real=n_real, block=b)
        spec = Spec(**{n: v for n, v in fields.items() if n in names})
        elem = {"bf16": 2, "fp16": 2, "fp32": 4}[dt]
        inv = trb._inv_kappa(spec)
        ncol = stat_columns(est)
        tag = f"{dt} V/tp={shard} tp={tp}" + (f" K={k} B={b}" if est == "sample" else "") + \
            (f" n_real={n_real}" if ragged else "")
        const = dict(INV_KAPPA=inv, KAPPA=1.3, **trb.stats_params(spec, elem, interpret=False))
        warps = const.pop("num_warps")
        opts = _options(warps, const)
        types = {"X": _DTYPES[dt], "LABEL_COL": "*i64", "OWNS": "*u8", "VALID": "*u8", "STATS": "*fp64",
                 "PREFIX": "*fp64"}
        # prefix: [N, n_blocks] (sample), else the stats buffer passed as a dummy
        const, div16 = _specialise(const, dict(stride_x=shard, stride_s=ncol, n_real=n_real, shard=shard,
                                               stride_p=spec.n_blocks if est == "sample" else ncol,
                                               n_blocks=spec.n_blocks))
        nt = const.get("NT", 0)
        out.append((f"stats {est} {tag}" + (f" pairs in registers NT={nt}" if nt else ""), trb._stats_kernel,
                    types, const, warps, div16, opts))
        if nt:  # the same row with its pairs parked in the prefix buffer (NT_MAX = 0: the GPU sweep's option)
            out.append((f"stats {est} {tag} parked", trb._stats_kernel, types, {**const, "NT": 0}, warps, div16,
                        opts))
        if est == "sample":
            const = dict(INV_KAPPA=inv, BETA=-0.1, MIX_PTR=False, HAS_LANES=False,
                         **trb.sample_params(spec, interpret=False))
            warps = const.pop("num_warps")
            opts = _options(warps, const)
            types = {"X": _DTYPES[dt], "KEYS": "*i64", "LABEL_COL": "*i64", "OWNS": "*u8", "OK": "*u8",
                     "TOTAL": "*fp64", "CUM": "*fp64", "SCALE": "*fp64", "PREFIX": "*fp64",
                     "PARTIAL": "*fp64", "COLS": "*i32", "WTS": "*fp32", "LANES": "*i32"}
            # cols, weights, lanes: [N, K]; rank_cum [N, tp]; partial [N, 2]
            const, div16 = _specialise(const, dict(stride_x=shard, stride_cum=tp, stride_p=spec.n_blocks, stride_part=2,
                                                   stride_c=k, stride_w=k, stride_l=k, n_real=n_real,
                                                   n_blocks=spec.n_blocks, K=k))
            out.append((f"sampler {tag}", trb._sample_kernel, types, const, warps, div16, opts))
        s = k if est == "sample" else 1
        for local in (False, True):
            const = dict(INV_KAPPA=inv, HAS_Q=est == "expected", HAS_LOCAL=local,
                         **trb.grad_params(spec, elem, s, interpret=False))
            warps = const.pop("num_warps")
            opts = _options(warps, const)
            types = {"X": _DTYPES[dt], "OUT": _DTYPES[dt], "G": "*fp32", "CPI": "*fp32", "CQ": "*fp32",
                     "COLS": "*i32", "WTS": "*fp32", "VALID": "*u8", "LOCAL": "*fp64"}
            # cols, weights: [N, S]; local: the forward's stats rows [N, ncol] (a dummy stride 0 without)
            const, div16 = _specialise(const, dict(stride_x=shard, stride_o=shard, stride_c=s, stride_w=s, S=s,
                                                   stride_l=ncol if local else 0, n_real=n_real, shard=shard))
            out.append((f"grad {est} {tag} S={s}" + (" local" if local else " 2-pass"), trb._grad_kernel, types,
                        const, warps, div16, opts))
    return out


def attrs_for(kernel, sig: dict, const: dict, div16: set) -> dict:
    """tt.divisibility 16 on every pointer and on the multiple-of-16 ints, as the JIT specialises."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
            if n not in const and (sig[n].startswith("*") or n in div16)}


def _resources(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes of the kernel, from the bundled ptxas's -v report."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        text = subprocess.run([tool, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src,
                               "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stderr
    num = {"regs": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
           "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads",
           "smem": r"(\d+) bytes smem"}
    out = {}
    for key, pat in num.items():
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else 0
    return out


def compile_report(arch: int = 90) -> list[dict]:
    """Compile every variant for sm_{arch}; one row per variant with its resources and seconds."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_aot needs TRITON_INTERPRET unset or 0 (the interpreter replaces the kernels)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    rows = []
    for label, kernel, types, const, warps, div16, opts in variants():
        t0 = time.perf_counter()
        sig = _sig(kernel, types, const)
        compiled = triton.compile(ASTSource(kernel, sig, const, attrs_for(kernel, sig, const, div16)), target=target,
                                  options=opts)
        rows.append(dict(variant=label, num_warps=warps, seconds=time.perf_counter() - t0,
                         **_resources(compiled.asm["ptx"], arch)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m otr_megatron.core.triton_aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper)")
    args = p.parse_args(argv)
    rows = compile_report(args.arch)
    print(f"{'variant':<56}{'warps':>6}{'regs':>6}{'stack':>7}{'spill st/ld':>12}{'s':>6}")
    for r in rows:
        print(f"{r['variant']:<56}{r['num_warps']:>6}{r['regs']:>6}{r['stack']:>7}"
              f"{r['spill_stores']:>6}/{r['spill_loads']:<5}{r['seconds']:>6.1f}")
    spilled = [r["variant"] for r in rows if r["spill_stores"] > MAX_SPILL_BYTES]
    if spilled:
        print(f"register spills over {MAX_SPILL_BYTES} bytes:", ", ".join(spilled))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
