#!/usr/bin/env python
"""GPU-proxy traffic counter for otr_megatron's Triton backend, on CPU (Triton interpreter).

    python count_bytes.py CHECKOUT [--tokens 64] [--vocab 32768] [--k 256] [--est sample expected sft]
                          [--params gpu|interp] [--json out.json]

Runs `vocab_parallel_otr_loss(..., backend="triton")` forward + backward (bf16 logits, tp=1) with
TRITON_INTERPRET=1 and counts, per Triton kernel launch, the global-memory traffic the kernel asks
for, by wrapping the interpreter's InterpreterBuilder.create_masked_load / create_masked_store
(every tl.load / tl.store goes through them; masked-off lanes are excluded):

- raw:      sum over load/store ops of (active lanes x element size). What the program requests;
            re-reads of the same address count every time (on a GPU they may hit L1/L2).
- sectors:  per op, distinct 32-byte sectors touched x 32 (transaction bytes of one instruction,
            no reuse across instructions: an upper bound for DRAM traffic, ignoring caches).
- per-prog: distinct 32-byte sectors per program (row), summed over programs: the traffic if a
            per-CTA L1 caught every intra-row re-read but nothing is shared between rows.
- footprint: distinct 32-byte sectors over the whole launch: the compulsory traffic (infinite L2).

Bytes are attributed to regions: logits (X), grad (OUT), prefix (the float64 block prefix sums),
other (stats, cols, weights, per-row vectors). PyTorch glue (ATen ops outside the kernels) is
counted separately with a TorchDispatchMode (inputs read once + outputs written once per op).

--params gpu (default) launches with the tile sizes / lane counts the wrappers choose on a GPU
(stats_params/sample_params/grad_params with interpret=False; PRECISE forced off since the
interpreter has no libdevice). Bytes do not depend on tile sizes except through per-op sector
dedup of gathers (the sampler's KC lanes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

os.environ["TRITON_INTERPRET"] = "1"  # before triton_backend is imported


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("checkout")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--est", nargs="+", default=["sample", "expected", "sft"])
    p.add_argument("--params", choices=["gpu", "interp"], default="gpu")
    p.add_argument("--inplace", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="v2 adaptation: fraction of tokens whose label is ignore_index (-100)")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.checkout))

    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import triton.runtime.interpreter as I

    import otr_megatron as otr
    from otr_megatron.core import triton_backend as trb

    torch.set_num_threads(1)
    SECTOR = 32
    state = {"launch": None, "regions": [], "prog_sectors": None, "in_kernel": False}
    launches = []

    def elem_bytes(ptrs):
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def record(kind, ptrs, mask):
        rec = state["launch"]
        if rec is None:
            return
        addr = np.asarray(ptrs.data).astype(np.uint64).ravel()
        m = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).ravel().astype(bool)
        addr = addr[m]
        if addr.size == 0:
            return
        eb = elem_bytes(ptrs)
        for name, lo, hi in state["regions"]:
            sel = (addr >= lo) & (addr < hi)
            if not sel.any():
                continue
            a_r = addr[sel]
            sec = np.unique(a_r // SECTOR)
            rec["raw"][kind][name] += int(a_r.size) * eb
            rec["sectors"][kind][name] += int(sec.size) * SECTOR
            rec["ops"][kind] += 1
            state["prog_sectors"][kind][name].append(sec)
            rec["_foot"][kind][name].append(sec)
            addr = addr[~sel]
            if addr.size == 0:
                return
        if addr.size:  # outside every registered region
            rec["raw"][kind]["unknown"] += int(addr.size) * eb

    orig_load = I.InterpreterBuilder.create_masked_load
    orig_store = I.InterpreterBuilder.create_masked_store
    orig_idx = I.InterpreterBuilder.set_grid_idx

    def masked_load(self, ptrs, mask, other, cm, ep, vol):
        record("ld", ptrs, mask)
        return orig_load(self, ptrs, mask, other, cm, ep, vol)

    def masked_store(self, ptrs, value, mask, cm, ep):
        record("st", ptrs, mask)
        return orig_store(self, ptrs, value, mask, cm, ep)

    def flush_prog():
        rec = state["launch"]
        ps = state["prog_sectors"]
        if rec is None or ps is None:
            return
        for kind, d in ps.items():
            for name, lst in d.items():
                if lst:
                    rec["per_prog"][kind][name] += int(np.unique(np.concatenate(lst)).size) * SECTOR
        state["prog_sectors"] = defaultdict(lambda: defaultdict(list))

    def set_grid_idx(self, x, y, z):
        flush_prog()
        return orig_idx(self, x, y, z)

    I.InterpreterBuilder.create_masked_load = masked_load
    I.InterpreterBuilder.create_masked_store = masked_store
    I.InterpreterBuilder.set_grid_idx = set_grid_idx

    orig_run = I.InterpretedFunction.run

    def dd():
        return defaultdict(lambda: defaultdict(int))

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        rec = {"kernel": self.fn.__name__, "grid": list(grid) if isinstance(grid, tuple) else grid,
               "raw": dd(), "sectors": dd(), "per_prog": dd(), "ops": defaultdict(int),
               "_foot": defaultdict(lambda: defaultdict(list)), "phase": state.get("phase")}
        state["launch"] = rec
        state["prog_sectors"] = defaultdict(lambda: defaultdict(list))
        state["in_kernel"] = True
        t0 = time.perf_counter()
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            flush_prog()
            rec["seconds"] = time.perf_counter() - t0
            rec["footprint"] = {k: {n: int(np.unique(np.concatenate(v)).size) * SECTOR for n, v in d.items() if v}
                                for k, d in rec.pop("_foot").items()}
            launches.append(rec)
            state["launch"] = None
            state["in_kernel"] = False

    I.InterpretedFunction.run = run

    # region registration: wrap the backend entry points (loss.py looks them up per call)
    def span(t):
        if t is None:
            return None
        st = t.untyped_storage()
        return st.data_ptr(), st.data_ptr() + st.nbytes()

    def with_regions(fn, named):
        def wrapped(*args, **kwargs):
            import inspect
            b = inspect.signature(fn).bind(*args, **kwargs)
            regs = []
            seen = set()
            for region, arg in named:
                s = span(b.arguments.get(arg))
                if s and s not in seen:
                    regs.append((region, s[0], s[1]))
                    seen.add(s)
            regs.append(("other", 0, 2**64 - 1))
            state["regions"] = regs
            return fn(*args, **kwargs)
        return wrapped

    trb.local_stats = with_regions(trb.local_stats, [("logits", "x"), ("prefix", "prefix_out")])
    trb.sample = with_regions(trb.sample, [("logits", "x"), ("prefix", "prefix")])
    trb.grad = with_regions(trb.grad, [("grad", "out"), ("logits", "x")])  # in place: counted as grad

    if a.params == "gpu":
        sp, smp, gp = trb.stats_params, trb.sample_params, trb.grad_params
        # v2 adaptation: INTERP selects the interpreter's NaN-max formulation (same loads and stores)
        trb.stats_params = lambda spec, eb, interpret=True: {**sp(spec, eb, False), "PRECISE": False, "INTERP": True}
        trb.sample_params = lambda spec, interpret=True: {**smp(spec, False), "PRECISE": False}
        trb.grad_params = lambda shard, eb, s, interpret=True: gp(shard, eb, s, False)

    _FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
             "alias", "_local_scalar_dense", "view", "slice", "select", "expand", "unsqueeze", "t", "permute",
             "transpose", "as_strided", "_unsafe_view", "squeeze", "unbind", "split"}

    class Glue(TorchDispatchMode):
        """ATen ops outside the Triton kernels: count and bytes (inputs read + outputs written)."""

        def __init__(self):
            super().__init__()
            self.ops = defaultdict(int)
            self.bytes = defaultdict(int)
            self.names = defaultdict(lambda: defaultdict(int))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket.__name__)
            free = getattr(func, "is_view", False) or name in _FREE  # views and allocations move nothing
            if not state["in_kernel"] and not free:
                ph = state.get("phase")
                nb = 0
                for x in list(args) + list((kwargs or {}).values()) + ([out] if not isinstance(out, (tuple, list)) else list(out)):
                    if isinstance(x, torch.Tensor):
                        nb += x.numel() * x.element_size()
                    elif isinstance(x, (tuple, list)):
                        nb += sum(y.numel() * y.element_size() for y in x if isinstance(y, torch.Tensor))
                self.ops[ph] += 1
                self.bytes[ph] += nb
                self.names[ph][str(func.overloadpacket.__name__)] += 1
            return out

    n, v, k = a.tokens, a.vocab, a.k
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(n, v, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g)
    if a.ignore_frac > 0:  # v2 adaptation: unsupervised rows
        labels[torch.rand(n, generator=g) < a.ignore_frac] = -100
    mask = (torch.rand(n, generator=g) > 0.1).float()
    elems = n * v
    report = {"tokens": n, "vocab": v, "k": k, "params": a.params, "inplace": a.inplace, "estimators": {}}

    for est in a.est:
        launches.clear()
        cfg = otr.OTRConfig(estimator=est, num_samples=k, backend="triton", inplace_backward=a.inplace)
        leaf = x0.clone().requires_grad_()
        glue = Glue()
        t0 = time.perf_counter()
        with glue:
            state["phase"] = "forward"
            inp = leaf * 1 if a.inplace else leaf
            loss = otr.vocab_parallel_otr_loss(inp, labels, cfg)
            obj = (loss * mask).sum()
            state["phase"] = "backward"
            obj.backward()
        wall = time.perf_counter() - t0
        rows = []
        for rec in launches:
            r = {"kernel": rec["kernel"], "phase": rec["phase"], "grid": rec["grid"], "seconds": rec["seconds"]}
            for metric in ("raw", "sectors", "per_prog"):
                for kind in ("ld", "st"):
                    for region, b in rec[metric][kind].items():
                        r[f"{metric}.{kind}.{region}"] = b
            for kind, d in rec["footprint"].items():
                for region, b in d.items():
                    r[f"footprint.{kind}.{region}"] = b
            r["ops"] = dict(rec["ops"])
            rows.append(r)
        report["estimators"][est] = {"launches": rows, "wall_s": wall,
                                     "glue_ops": dict(glue.ops), "glue_bytes": dict(glue.bytes),
                                     "glue_names": {k2: dict(v2) for k2, v2 in glue.names.items()}}
        print(f"\n== {est}  N={n} V={v} K={k} bf16  ({wall:.1f} s in the interpreter) ==")
        print(f"{'kernel':<16}{'metric':<10}{'ld logits':>10}{'ld prefix':>10}{'ld other':>10}"
              f"{'st prefix':>10}{'st grad':>9}{'st other':>9}{'total':>8}   (bytes per logit element)")
        tot = defaultdict(float)
        for r in rows:
            for metric in ("raw", "sectors", "per_prog", "footprint"):
                def gb(kind, region):
                    return r.get(f"{metric}.{kind}.{region}", 0) / elems
                vals = [gb("ld", "logits") + gb("ld", "grad"), gb("ld", "prefix"), gb("ld", "other"),
                        gb("st", "prefix"), gb("st", "grad") + gb("st", "logits"), gb("st", "other")]
                t = sum(vals)
                tot[metric] += t
                print(f"{r['kernel']:<16}{metric:<10}" + "".join(f"{x:>10.4f}" if i < 4 else f"{x:>9.4f}"
                                                               for i, x in enumerate(vals)) + f"{t:>8.3f}")
        for metric, t in tot.items():
            print(f"{'ALL KERNELS':<16}{metric:<10}{'':>58}{t:>8.3f}")
        for ph in ("forward", "backward"):
            print(f"glue {ph}: {glue.ops.get(ph, 0)} ATen ops, {glue.bytes.get(ph, 0) / elems:.4f} B/elem "
                  f"(ATen-level, inputs + outputs)")
        report["estimators"][est]["totals_B_per_elem"] = dict(tot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", a.json)


if __name__ == "__main__":
    main()
