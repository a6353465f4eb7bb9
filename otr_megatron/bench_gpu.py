"""GPU acceptance benchmark: the OTR loss (Triton and torch backends) against the cross entropies
it replaces, forward + backward on bf16 logits, one GPU.

    python -m otr_megatron.bench_gpu --out results.json          # N=8192, V/tp in {131072, 16384}
    python -m otr_megatron.bench_gpu --dry-run --out dry.json    # CPU, Triton interpreter, tiny sizes

Times are CUDA-event medians of >= 20 round-robin repetitions after warm-ups; each method's upstream
gradient is a per-token weight vector (as Megatron's loss mask), except Liger's CE, whose backward
only takes a scalar (it is given reduction="sum"). Reported per method: median ms, ratio to
Megatron's fused vocab-parallel CE, the effective bandwidth at the 6 bytes per logit element an
ideal fused loss moves (read forward, read + write backward), and the peak extra memory (beyond
logits and gradient) as a fraction of the logits. Per Triton kernel: time alone and achieved
bandwidth from the bytes it moves, as a fraction of the measured device-to-device copy bandwidth.

One GPU means tp = 1: "V/tp = 16384" runs a 16384-id vocabulary on one rank. That is pessimistic
for the sampler against a real tp = 8 rank (which owns ~1/8 of the samples) and picks B from a
16384 vocabulary (B = 8 at K = 256 instead of 16).

Baselines load only where they import: megatron-core (fused and unfused vocab-parallel CE, on a
world-size-1 process group), liger-kernel, Transformer Engine (`parallel_cross_entropy`); a missing
one is listed with the reason, and one named in ``--require-baselines`` fails the run (exit 3).

Stages, each writing the JSON report as soon as it has a number (a run cut short keeps what it
measured): the CUDA-graph check (forward + backward of `vocab_parallel_otr_loss` with a 0-dim int64
device step, captured, replayed, compared with eager calls; on CPU the same calls without capture),
a short sweep of each Triton kernel's launch settings (``num_warps`` and tile sizes, overriding what
`stats_params` / `sample_params` / `grad_params` return; every candidate must reproduce the default's
results, the fastest is picked and used for the benchmark), then the benchmark per V/tp, then the
output layer + loss per V/tp (hidden ``[N, d]``, weight ``[V/tp, d]``, bf16; Megatron's CE after the
matmul, unfused OTR after the matmul, and the fused `vocab_parallel_linear_otr_loss` at
`default_linear_chunk` and 1/4 of it; time and peak memory beyond inputs, weight and both gradients).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

TARGETS = {  # ratio to Megatron's fused CE, forward + backward (issue 10; gpu-kernels.md)
    "sample": 0.45, "expected": 0.40, "sft": 0.35, "dft": 0.35,
}
KERNEL_BW_TARGET = 0.5  # each kernel >= 50% of the measured copy bandwidth
SAMPLER_SHARE_TARGET = 0.10  # sampler <= 10% of the sample estimator's time
MEM_TARGET = {"sample": 0.30, "expected": 0.05, "sft": 0.05, "dft": 0.05}  # extra memory / logits
LINEAR_TIME_TARGET = 1.3  # fused output layer + loss: time / (matmul + unfused OTR)
LINEAR_MEM_TARGET = 0.10  # and its extra peak memory / the unfused path's
BASELINE_MODULES = {"megatron": "megatron.core", "liger": "liger_kernel", "te": "transformer_engine"}
BASELINE_NAMES = {"megatron": ("megatron fused CE", "megatron CE"), "liger": ("liger CE",),
                  "te": ("TE parallel CE",)}


class Report(dict):
    """The JSON report, rewritten to disk after every measurement (a run cut short keeps its numbers)."""

    def __init__(self, path, **fields):
        super().__init__(fields)
        self.path = path

    def save(self):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self, f, indent=1, default=_json_default)
        os.replace(tmp, self.path)


def _json_default(o):
    return None if isinstance(o, float) and math.isnan(o) else str(o)


def _call(fn, **kwargs):
    """Call a backend entry point with the arguments its signature names (contract v1 or v2)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _spec(**fields):
    """A `Spec` from the fields this version of the contract has (v2 has no ``step``)."""
    from otr_megatron.core.contract import Spec

    names = {f.name for f in dataclasses.fields(Spec)}
    return Spec(**{k: v for k, v in fields.items() if k in names})


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m otr_megatron.bench_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--shards", type=int, nargs="+", default=[131072, 16384], help="V/tp values")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench_gpu.json", help="JSON results file")
    p.add_argument("--no-torch-backend", action="store_true", help="skip the (slow) torch path")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + Triton interpreter, tiny sizes, 1 repetition: checks the script, not speed")
    p.add_argument("--require-baselines", nargs="*", default=[], choices=sorted(BASELINE_MODULES),
                   help="baselines that must run: a missing one fails the run (exit 3) before any timing")
    p.add_argument("--budget-s", type=float, default=290.0,
                   help="wall-clock budget of the whole run; the sweep stops early to keep it")
    p.add_argument("--sweep-s", type=float, default=100.0, help="budget of the launch-settings sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-settings sweep")
    p.add_argument("--no-graph-check", action="store_true", help="skip the CUDA-graph check")
    p.add_argument("--hidden", type=int, default=4096, help="d of the output-layer stage")
    p.add_argument("--linear-chunks", type=int, nargs="*", default=None,
                   help="fused_chunk_tokens values of the fused output layer (default: default_linear_chunk and 1/4 of it; "
                        "dry run: 1 and default_linear_chunk)")
    p.add_argument("--no-linear", action="store_true", help="skip the output layer + loss stage")
    a = p.parse_args(argv)
    if a.dry_run:
        a.tokens, a.shards, a.repeats, a.warmup, a.num_samples, a.hidden = 2, [256], 1, 0, 8, 16
    if a.repeats < 1 or a.tokens < 1:
        p.error(f"--repeats and --tokens must be >= 1, got {a.repeats} and {a.tokens}")
    return a


class Timer:
    """CUDA events on a GPU (perf_counter around a synchronize on CPU)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn) -> float:
        torch = self.torch
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _peak_extra(fn, device, keep_bytes: int) -> int | None:
    """Peak bytes allocated during fn beyond what existed before and `keep_bytes` (the gradient)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - base - keep_bytes, 0)


def copy_bandwidth(device, nbytes: int, repeats: int, timer) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(max(repeats, 3))]
    return 2 * nbytes / statistics.median(times)


def _baselines(leaf, labels, mask, group, device):
    """(name, fn or None, note) for each cross entropy that imports here."""
    import torch

    out = []
    try:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def mfused():
            (fused_vocab_parallel_cross_entropy(leaf, labels, group) * mask).sum().backward()

        def munfused():
            (vocab_parallel_cross_entropy(leaf, labels) * mask).sum().backward()

        out += [("megatron fused CE", mfused, ""), ("megatron CE", munfused, "")]
    except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
        out += [("megatron fused CE", None, f"{type(e).__name__}: {e}"), ("megatron CE", None, "")]
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        # Liger writes its gradient into the input during the forward: give it its own buffer
        liger_leaf = leaf.detach().clone().requires_grad_()

        def liger():
            liger_cross_entropy(liger_leaf, labels, reduction="sum").backward()
            liger_leaf.grad = None

        out.append(("liger CE", liger, "reduction='sum' (scalar upstream gradient only)"))
    except Exception as e:  # noqa: BLE001
        out.append(("liger CE", None, f"{type(e).__name__}: {e}"))
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy

        def te():
            (parallel_cross_entropy(leaf, labels, 0.0, False, group) * mask).sum().backward()

        out.append(("TE parallel CE", te, ""))
    except Exception as e:  # noqa: BLE001
        out.append(("TE parallel CE", None, f"{type(e).__name__}: {e}"))
    del torch
    return out


def _otr_methods(leaf, labels, mask, k, backends):
    import otr_megatron as otr

    out = []
    for backend in backends:
        for est in ("sample", "expected", "sft", "dft"):
            # default chunking: every row in one launch for Triton, cache/memory-sized chunks for torch
            cfg = otr.OTRConfig(estimator=est, num_samples=k, backend=backend)

            def fn(cfg=cfg):
                (otr.vocab_parallel_otr_loss(leaf, labels, cfg) * mask).sum().backward()

            name = f"OTR {est}" + (f" K={k}" if est == "sample" else "")
            out.append((f"{name} [{backend}]", fn, est, backend))
    return out


class KernelCase:
    """Real inputs of each Triton kernel alone on bf16 logits ``x [N, V]`` (tp = 1): the statistics
    of an estimator, the sampler on those statistics, the gradient with S sparse entries per row
    (distinct columns, as the Triton sampler leaves them after merging duplicates)."""

    def __init__(self, x, k):
        import torch

        from otr_megatron.core import triton_backend as trb
        from otr_megatron.core.contract import STAT_TMASS, block_size
        from otr_megatron.core.random import stream_key

        self.trb, self.x, self.k = trb, x, k
        n, v = x.shape
        dev = x.device
        g = torch.Generator(device=dev).manual_seed(1)
        self.labels = torch.randint(0, v, (n,), device=dev, generator=g)
        self.owns = torch.ones(n, dtype=torch.bool, device=dev)
        self.valid = torch.ones(n, dtype=torch.bool, device=dev)
        self.keys = torch.arange(n, device=dev)
        self.specs, self.stats, self.prefix = {}, {}, {}
        for est in ("sample", "expected", "sft"):
            blk = block_size(v, k, v) if est == "sample" else 1
            spec = _spec(estimator=est, kappa=1.3, beta=-0.1, k=k, seed=1234, step=0, rank=0, world=1, shard=v,
                         n_real=v, block=blk)
            self.specs[est] = spec
            self.stats[est] = torch.empty(n, spec.stat_columns, dtype=torch.float64, device=dev)
            self.prefix[est] = (torch.empty(n, spec.n_blocks, dtype=torch.float64, device=dev)
                                if est == "sample" else None)
            self.run_stats(est)
        self.key_mix = stream_key(1234, 0)
        sample_params = inspect.signature(trb.sample).parameters
        col_dtype = torch.int32 if "key_mix" in sample_params else torch.int64  # contract v2: int32 columns
        self.total = self.stats["sample"][:, STAT_TMASS].contiguous()
        self.cum = self.total[:, None].contiguous()
        self.ok = torch.isfinite(self.total)
        self.scale = torch.ones_like(self.total)
        self.partial = torch.empty(n, 2, dtype=torch.float64, device=dev)
        self.cols = torch.empty(n, k, dtype=col_dtype, device=dev)
        self.weights = torch.empty(n, k, dtype=torch.float32, device=dev)
        self.grad_in = {}
        for est, s in (("sample", k), ("expected", 1), ("sft", 1)):
            rows = torch.arange(n, device=dev)[:, None]
            gcols = ((rows * 7919 + torch.arange(s, device=dev) * max(v // s, 1)) % v).to(col_dtype)
            self.grad_in[est] = (gcols, torch.full((n, s), -1.0 / s, device=dev),
                                 torch.rand(n, device=dev, generator=g), torch.rand(n, device=dev, generator=g),
                                 torch.rand(n, device=dev, generator=g) if est == "expected" else None)
        self.out = torch.empty_like(x)

    def run_stats(self, est):
        _call(self.trb.local_stats, x=self.x, label_col=self.labels, owns_label=self.owns, valid=self.valid,
              spec=self.specs[est], stats_out=self.stats[est], prefix_out=self.prefix[est], scratch=None)
        return self.stats[est], self.prefix[est]

    def run_sample(self):
        _call(self.trb.sample, x=self.x, keys=self.keys, key_mix=self.key_mix, label_col=self.labels,
              owns_label=self.owns, ok=self.ok, total=self.total, rank_cum=self.cum, rank_scale=self.scale,
              prefix=self.prefix["sample"], spec=self.specs["sample"], partial_out=self.partial, cols_out=self.cols,
              weights_out=self.weights, lanes_out=None, scratch=None)
        return self.partial, self.cols, self.weights

    def run_grad(self, est, local=None):
        gcols, gw, g, coef, cq = self.grad_in[est]
        kw = {"local": local} if local is not None else {}
        self.trb.grad(self.x, self.out, g, coef, cq, gcols, gw, self.valid, self.specs[est], None, **kw)
        return self.out


def kernel_timings(case: KernelCase, timer, repeats, copy_bw, rows=None, save=None):
    """Each Triton kernel alone on the sample estimator's (and sft's) real inputs: appended to
    ``rows`` (``save()`` after each)."""
    x = case.x
    n, v = x.shape
    dev = x.device
    rows = [] if rows is None else rows

    def med(fn):
        if dev.type == "cuda":
            fn()  # compile
        return statistics.median(timer(fn) for _ in range(repeats))

    def add(row):
        rows.append(row)
        if save is not None:
            save()

    elem = x.element_size()
    for est in ("sample", "expected", "sft"):
        spec = case.specs[est]
        t = med(lambda: case.run_stats(est))
        moved = n * v * elem + (n * spec.n_blocks * 8 * 3 if est == "sample" else 0)
        add(dict(kernel=f"stats [{est}]", ms=t * 1e3, bytes=moved, tbps=moved / t / 1e12,
                 frac_copy=moved / t / copy_bw, regs=_regs("stats")))
        if est == "sample":
            t = med(case.run_sample)
            add(dict(kernel="sampler", ms=t * 1e3, bytes=None, tbps=None, frac_copy=None, regs=_regs("sample")))
        for local in (None, case.stats[est]):
            t = med(lambda: case.run_grad(est, local))
            moved = n * v * elem * (2 if local is not None else 3)
            tag = "one pass, local stats given" if local is not None else "two passes"
            add(dict(kernel=f"grad [{est}, {tag}]", ms=t * 1e3, bytes=moved, tbps=moved / t / 1e12,
                     frac_copy=moved / t / copy_bw, regs=_regs("grad")))
    return rows


# --------------------------------------------------------------------------------------------
# output layer + loss: the matmul and a loss, against the fused vocab_parallel_linear_otr_loss
# --------------------------------------------------------------------------------------------


def linear_bench(device, n, d, v, k, chunks, repeats, warmup, timer, group, entry, save, t_end):
    """Forward + backward of hidden ``[n, d]`` @ weight ``[v, d]``.T and a loss (tp = 1), per method:
    Megatron's CEs and unfused OTR (Triton) after ``torch.mm``, the fused path per chunk size. Fills
    ``entry["methods"]`` (saved after every repetition); peak memory beyond the inputs, the weight
    and the two gradients. Stops repeating at ``t_end`` (perf_counter) and says so."""
    import torch

    import otr_megatron as otr

    gen = torch.Generator(device=device).manual_seed(5)
    hidden = torch.randn(n, d, device=device, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, d, device=device, generator=gen) * (2.0 / d**0.5)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    mask = (torch.rand(n, device=device, generator=gen) > 0.1).float()
    grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()

    def mm():
        return torch.mm(hidden, weight.t())  # ColumnParallelLinear's compute at tp = 1, no bias

    methods = []  # (name, kind, chunk, fn)
    try:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        if group is not None:
            methods.append(("mm + megatron fused CE", "baseline", None,
                            lambda: (fused_vocab_parallel_cross_entropy(mm(), labels, group) * mask).sum().backward()))
        methods.append(("mm + megatron CE", "baseline", None,
                        lambda: (vocab_parallel_cross_entropy(mm(), labels) * mask).sum().backward()))
    except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
        entry["notes"].append(f"megatron CE not run: {type(e).__name__}: {e}")
    cfg = otr.OTRConfig(estimator="sample", num_samples=k, backend="triton")
    methods.append((f"mm + OTR K={k} [triton]", "unfused", None,
                    lambda: (otr.vocab_parallel_otr_loss(mm(), labels, cfg) * mask).sum().backward()))
    for c in chunks:
        ccfg = dataclasses.replace(cfg, fused_chunk_tokens=c)

        def fused(ccfg=ccfg):
            (otr.vocab_parallel_linear_otr_loss(hidden, weight, labels, ccfg) * mask).sum().backward()

        methods.append((f"fused OTR K={k} c={c} [triton]", "fused", c, fused))

    def clear():
        hidden.grad = weight.grad = None

    for _, _, _, fn in methods:  # warm-up (compiles the kernels at the chunk shapes)
        for _ in range(max(warmup, 1) if device.type == "cuda" else 1):
            fn()
            clear()
    times = {m[0]: [] for m in methods}
    rows = entry["methods"]
    for rep in range(repeats):
        if rep and time.perf_counter() > t_end:
            entry["truncated"] = f"budget spent after {rep} repetitions"
            break
        for name, _, _, fn in methods:
            times[name].append(timer(fn))
            clear()
        rows[:] = [dict(method=name, kind=kind, chunk=c, ms=statistics.median(times[name]) * 1e3,
                        peak_extra_bytes=None) for name, kind, c, _ in methods]
        entry["repeats_done"] = rep + 1
        save()
    for row, (_, _, _, fn) in zip(rows, methods):
        row["peak_extra_bytes"] = _peak_extra(fn, device, grads_bytes)
        clear()
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    unfused = next(r for r in rows if r["kind"] == "unfused")
    for r in rows:
        r["vs_baseline"] = r["ms"] / base["ms"] if base else None
        r["vs_unfused"] = r["ms"] / unfused["ms"]
        pu, pr = unfused["peak_extra_bytes"], r["peak_extra_bytes"]
        r["peak_vs_unfused"] = pr / pu if pu and pr is not None else None
        if r["kind"] == "fused" and device.type == "cuda":
            r["meets_time_target"] = r["vs_unfused"] <= LINEAR_TIME_TARGET
            r["meets_memory_target"] = r["peak_vs_unfused"] is not None and r["peak_vs_unfused"] <= LINEAR_MEM_TARGET
    save()
    return rows


def _print_linear(entry):
    print(f"\noutput layer + loss: N={entry['tokens']}  d={entry['hidden']}  V/tp={entry['shard']}  bf16  "
          f"forward+backward  (base: {entry['methods'][0]['method'] if entry['methods'] else '-'})", flush=True)
    print(f"{'method':<34}{'ms':>9}{'x base':>8}{'x unfused':>10}{'peak MiB':>10}{'x unfused':>10}  "
          f"targets (time <= {LINEAR_TIME_TARGET}, memory <= {LINEAR_MEM_TARGET} x unfused)")
    for r in entry["methods"]:
        peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        tgt = ""
        if "meets_time_target" in r:
            tgt = (f"time {'PASS' if r['meets_time_target'] else 'FAIL'}, "
                   f"memory {'PASS' if r['meets_memory_target'] else 'FAIL'}")
        print(f"{r['method']:<34}{r['ms']:>9.3f}{_fmt(r['vs_baseline'], '>8.3f')}{r['vs_unfused']:>10.3f}"
              f"{_fmt(peak, '>10.1f')}{_fmt(r['peak_vs_unfused'], '>10.3f')}  {tgt}", flush=True)


# --------------------------------------------------------------------------------------------
# launch-settings sweep: override what the params functions return, keep the fastest correct one
# --------------------------------------------------------------------------------------------

PARAM_FUNCS = {"stats": "stats_params", "sampler": "sample_params", "grad": "grad_params"}
TILE_KEYS = ("TILE", "NB", "NR", "KC")  # tile-size knobs a params dict may hold (per kernel version)


class LaunchOverrides:
    """Wraps `stats_params` / `sample_params` / `grad_params` of the Triton backend so their results
    are updated with per-kernel overrides (the kernels read them as module globals at each call).
    Keys: "stats [sample]", "stats [dense]" (expected, sft, dft), "sampler", "grad"."""

    def __init__(self, trb):
        self.trb = trb
        self.orig = {name: getattr(trb, fn) for name, fn in PARAM_FUNCS.items()}
        self.active: dict[str, dict] = {}
        self.last: dict[str, dict] = {}  # the parameters of the last launch per key, overrides applied
        for name, fn in PARAM_FUNCS.items():
            setattr(trb, fn, self._wrap(name, self.orig[name]))

    @staticmethod
    def key(name, spec):
        if name == "stats":
            return "stats [sample]" if spec.estimator == "sample" else "stats [dense]"
        return name

    def _wrap(self, name, fn):
        def params(spec, *args, **kwargs):
            out = dict(fn(spec, *args, **kwargs))
            key = self.key(name, spec)
            out.update(self.active.get(key, {}))
            self.last[key] = dict(out)
            return out

        params.__wrapped__ = fn
        return params

    def restore(self):
        for name, fn in PARAM_FUNCS.items():
            setattr(self.trb, fn, self.orig[name])


def _candidates(default: dict, max_kc: int | None = None) -> list[dict]:
    """num_warps halved and doubled, then each tile knob halved and doubled (powers of two)."""
    out = []
    w = default.get("num_warps", 8)
    for nw in (w // 2, w * 2):
        if 2 <= nw <= 16:
            out.append({"num_warps": nw})
    for key in TILE_KEYS:
        if key not in default or not isinstance(default[key], int):
            continue
        for val in (default[key] // 2, default[key] * 2):
            if val < 1 or (key == "KC" and max_kc is not None and val > max_kc):
                continue
            if key == "KC" and "KP" in default and default["KP"] % val:
                continue
            out.append({key: val})
    return out


def _same(a, b, rtol):
    import torch

    if a is None or b is None:
        return a is b
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=1e-30 if rtol == 0 else 1e-12, equal_nan=True)


def sweep(case: KernelCase, timer, repeats, budget_s, report_entry, save):
    """Times each kernel under each candidate override; a candidate counts only if it reproduces the
    default's results (statistics and gradient to 1e-6 / one bf16 ulp, samples exactly). Returns
    the picks {key: override} and fills ``report_entry`` (saved after every candidate)."""
    import torch

    trb = case.trb
    ov = LaunchOverrides(trb)
    t_end = time.perf_counter() + budget_s
    picks = {}
    jobs = [
        ("stats [sample]", lambda: case.run_stats("sample"), 1e-6),
        ("stats [dense]", lambda: case.run_stats("expected"), 1e-6),
        ("sampler", case.run_sample, 0.0),
        ("grad", lambda: case.run_grad("sample"), 2.0**-7),
    ]
    try:
        for key, fn, rtol in jobs:
            ov.active.pop(key, None)

            def snapshot():
                out = fn()
                return tuple(t.clone() if isinstance(t, torch.Tensor) else t
                             for t in (out if isinstance(out, tuple) else (out,)))

            ref = snapshot()  # also records the default parameters of this launch
            default = ov.last[key]
            entry = report_entry.setdefault(key, {"default": {k: v for k, v in default.items()
                                                               if isinstance(v, (int, bool, float))},
                                                  "candidates": []})
            base_ms = statistics.median(timer(fn) for _ in range(repeats)) * 1e3
            entry["default_ms"] = base_ms
            best, best_ms = {}, base_ms
            save()
            for cand in _candidates(default, max_kc=default.get("KP")):
                if time.perf_counter() > t_end:
                    entry["truncated"] = "sweep budget spent"
                    break
                ov.active[key] = cand
                row = {"override": cand}
                try:
                    got = snapshot()
                    row["matches_default"] = all(_same(a, b, rtol) for a, b in zip(got, ref))
                    row["ms"] = statistics.median(timer(fn) for _ in range(repeats)) * 1e3
                    if row["matches_default"] and row["ms"] < best_ms:
                        best, best_ms = cand, row["ms"]
                except Exception as e:  # noqa: BLE001 (a setting that does not compile or launch is not a pick)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                entry["candidates"].append(row)
                ov.active.pop(key, None)
                save()
            entry["pick"], entry["pick_ms"] = best, best_ms
            picks[key] = best
            save()
    finally:
        ov.restore()
    return picks


# --------------------------------------------------------------------------------------------
# CUDA-graph check: forward + backward captured with a 0-dim int64 device step, replayed
# --------------------------------------------------------------------------------------------


def graph_check(device, n, v, k, backends):
    """Per (estimator, backend): the loss and gradient of a replayed CUDA graph (captured with a
    0-dim int64 device ``step``) equal eager calls with the int step, at two steps (the replay reads
    the step tensor, it is not baked in). On CPU (dry run) the same tensor-step calls run eagerly."""
    import torch

    import otr_megatron as otr

    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(3)
    x0 = (torch.randn(n, v, device=device, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::7] = -100
    mask = (torch.rand(n, device=device, generator=g) > 0.1).float()
    rows = []
    for backend in backends:
        for est in ("sample", "expected", "sft", "dft"):
            row = {"estimator": est, "backend": backend, "captured": cuda}
            try:
                cfg = otr.OTRConfig(estimator=est, num_samples=k, backend=backend)

                def eager(step):
                    xe = x0.clone().requires_grad_()
                    loss = otr.vocab_parallel_otr_loss(xe, labels, cfg, step=step)
                    (loss * mask).sum().backward()
                    return loss.detach(), xe.grad

                step_t = torch.tensor(5, dtype=torch.int64, device=device)
                xs = x0.clone().requires_grad_()

                def body():
                    loss = otr.vocab_parallel_otr_loss(xs, labels, cfg, step=step_t)
                    (loss * mask).sum().backward()
                    return loss

                if cuda:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up outside the graph (compiles, allocates)
                        for _ in range(2):
                            body()
                            xs.grad = None
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_loss = body()
                    static_grad = xs.grad

                    def replay(step):
                        step_t.fill_(step)
                        graph.replay()
                        torch.cuda.synchronize()
                        return static_loss.clone(), static_grad.clone()
                else:
                    def replay(step):
                        step_t.fill_(step)
                        xs.grad = None
                        loss = body()
                        return loss.detach().clone(), xs.grad.clone()

                for step in (5, 6):
                    got_loss, got_grad = replay(step)
                    ref_loss, ref_grad = eager(step)
                    row[f"step{step}_loss_equal"] = bool(torch.equal(got_loss, ref_loss))
                    row[f"step{step}_grad_equal"] = bool(torch.equal(got_grad, ref_grad))
                    # the torch path's scatter-add of duplicate samples uses atomics on CUDA: a few ulps
                    row[f"step{step}_grad_max_abs_diff"] = float((got_grad.float() - ref_grad.float()).abs().max())
                    row[f"step{step}_grad_close"] = bool(torch.allclose(got_grad.float(), ref_grad.float(),
                                                                        rtol=2.0**-7, atol=1e-7))
                if hasattr(otr, "check_pending"):
                    otr.check_pending()
                row["ok"] = all(row[f"step{s}_loss_equal"] and (row[f"step{s}_grad_equal"] or
                                (backend == "torch" and row[f"step{s}_grad_close"])) for s in (5, 6))
            except Exception as e:  # noqa: BLE001 (recorded, and fails the run)
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
    return rows


def _regs(name):
    from otr_megatron.core import triton_backend as trb

    h = trb.LAST_LAUNCH.get(name)
    if h is None:
        return None
    return {k: getattr(h, k, None) for k in ("n_regs", "n_spills", "shared")}


def _missing_baselines(required) -> dict:
    """{name: reason} for each required baseline whose package does not import."""
    import importlib

    out = {}
    for name in required:
        try:
            importlib.import_module(BASELINE_MODULES[name])
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


def run(args) -> Report:
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_backend is imported
    import torch
    import torch.distributed as dist

    import triton

    from otr_megatron.distributed import free_port, teardown_parallel

    t_start = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() and not args.dry_run else torch.device("cpu")
    if device.type == "cpu" and not args.dry_run:
        raise SystemExit("bench_gpu needs a CUDA device (use --dry-run to check the script on CPU)")
    report = Report(
        args.out,
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        dry_run=args.dry_run, python=platform.python_version(), torch=torch.__version__,
        triton=triton.__version__, tokens=args.tokens, num_samples=args.num_samples,
        repeats=args.repeats, warmup=args.warmup, dtype="bf16", shards=[], notes=[], errors=[],
        required_baselines=list(args.require_baselines), baselines_missing={}, stage_seconds={},
        launch_sweep={}, launch_picks={}, graph_check=None, linear=[], hidden=args.hidden, complete=False,
    )
    report["baselines_missing"] = _missing_baselines(args.require_baselines)
    report.save()
    if report["baselines_missing"]:
        for name, why in report["baselines_missing"].items():
            report["errors"].append(f"required baseline {name} ({BASELINE_MODULES[name]}) does not import: {why}")
        report.save()
        return report
    timer = Timer(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    group = None
    try:
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        group = ps.get_tensor_model_parallel_group()
    except Exception as e:  # noqa: BLE001
        print(f"megatron-core unavailable ({type(e).__name__}: {e}); no Megatron baselines", flush=True)
    n, k = args.tokens, args.num_samples
    backends = ["triton"] + ([] if args.no_torch_backend else ["torch"])

    def stage(name, t0):
        report["stage_seconds"][name] = round(time.perf_counter() - t0, 2)
        report.save()

    t0 = time.perf_counter()
    biggest = n * max(args.shards) * 2
    report["copy_TBps"] = copy_bandwidth(device, biggest, args.repeats, timer) / 1e12
    print(f"{report['device']}: device-to-device copy {report['copy_TBps']:.2f} TB/s "
          f"(read + write, {biggest / 2**30:.2f} GiB)", flush=True)
    stage("copy bandwidth", t0)

    if not args.no_graph_check:  # small shapes: the check is about capture, not speed
        t0 = time.perf_counter()
        gn, gv = (2, 256) if args.dry_run else (512, 16384)
        report["graph_check"] = graph_check(device, gn, gv, k, backends)
        for r in report["graph_check"]:
            status = "PASS" if r["ok"] else "FAIL"
            print(f"graph check [{r['estimator']}, {r['backend']}] {'captured + replayed' if r['captured'] else 'eager (CPU)'}"
                  f": {status}{'  ' + r['error'] if 'error' in r else ''}", flush=True)
            if not r["ok"]:
                report["errors"].append(f"graph check failed: {r}")
        stage("graph check", t0)

    from otr_megatron.core import triton_backend as trb

    overrides = LaunchOverrides(trb)
    try:
        for v in args.shards:
            gen = torch.Generator(device=device).manual_seed(0)
            leaf = (torch.randn(n, v, device=device, generator=gen) * 2).to(torch.bfloat16).requires_grad_()
            labels = torch.randint(0, v, (n,), device=device, generator=gen)
            mask = (torch.rand(n, device=device, generator=gen) > 0.1).float()
            logits_bytes = leaf.numel() * leaf.element_size()
            case = KernelCase(leaf.detach(), k)
            picks = {}
            if not args.no_sweep:
                t0 = time.perf_counter()
                left = args.budget_s - (t0 - t_start)
                per_shard = min(args.sweep_s / len(args.shards), max(left - 60.0, 0.0))
                entry = report["launch_sweep"].setdefault(str(v), {})
                overrides.restore()
                picks = sweep(case, timer, max(3, min(args.repeats, 7)), per_shard, entry, report.save)
                overrides = LaunchOverrides(trb)
                report["launch_picks"][str(v)] = picks
                print(f"V/tp={v}: launch picks {picks or 'the defaults'}", flush=True)
                stage(f"sweep V/tp={v}", t0)
            overrides.active = dict(picks)  # the benchmark runs with the picks
            t0 = time.perf_counter()
            shard = dict(shard=v, logits_bytes=logits_bytes, launch_overrides=picks, methods=[], kernels=[])
            report["shards"].append(shard)
            methods = []
            for name, fn, note in _baselines(leaf, labels, mask, group, device):
                if fn is None:
                    report["notes"].append(f"V/tp={v}: {name} not run: {note}" if note else f"{name} not run")
                else:
                    methods.append((name, fn, "baseline", None, note))
            for name, fn, est, backend in _otr_methods(leaf, labels, mask, k, backends):
                methods.append((name, fn, est, backend, ""))
            for _, fn, *_ in methods:  # warm-up (compiles the kernels)
                for _ in range(max(args.warmup, 1) if device.type == "cuda" else 1):
                    fn()
                    leaf.grad = None
            times = {m[0]: [] for m in methods}
            rows = shard["methods"]
            for rep in range(args.repeats):  # round-robin: machine noise hits every method alike
                for name, fn, *_ in methods:
                    times[name].append(timer(fn))
                    leaf.grad = None
                rows[:] = _method_rows(methods, times, n, v, device)
                shard["repeats_done"] = rep + 1
                report.save()
            for row, (name, fn, *_) in zip(rows, methods):
                peak = _peak_extra(fn, device, logits_bytes)
                leaf.grad = None
                row["peak_extra_bytes"] = peak
                row["peak_extra_vs_logits"] = None if peak is None else peak / logits_bytes
                if row["backend"] == "triton" and peak is not None and row["estimator"] in MEM_TARGET:
                    row["meets_memory_target"] = row["peak_extra_vs_logits"] <= MEM_TARGET[row["estimator"]]
                report.save()
            stage(f"methods V/tp={v}", t0)
            t0 = time.perf_counter()
            kernels = kernel_timings(case, timer, args.repeats, report["copy_TBps"] * 1e12, rows=shard["kernels"],
                                     save=report.save)
            sample_ms = next((r["ms"] for r in rows if r["estimator"] == "sample" and r["backend"] == "triton"), None)
            for kr in kernels:
                if kr["frac_copy"] is not None and device.type == "cuda":
                    kr["meets_bw_target"] = kr["frac_copy"] >= KERNEL_BW_TARGET
                if kr["kernel"] == "sampler" and sample_ms:
                    kr["share_of_sample_estimator"] = kr["ms"] / sample_ms
                    kr["meets_share_target"] = kr["share_of_sample_estimator"] <= SAMPLER_SHARE_TARGET
            stage(f"kernels V/tp={v}", t0)
            _print_shard(n, v, rows, kernels)
            del leaf, case
        if not args.no_linear:
            from otr_megatron.core.linear_loss import default_linear_chunk

            for v in args.shards:
                left = args.budget_s - (time.perf_counter() - t_start)
                if left < (5.0 if args.dry_run else 25.0):
                    report["notes"].append(f"output layer V/tp={v} not run: {left:.0f} s of the budget left")
                    continue
                t0 = time.perf_counter()
                # the Triton backend's default (one_pass: the gradient in place of the chunk's logits)
                base_chunk = _call(default_linear_chunk, shard=v, on_gpu=device.type == "cuda", one_pass=True)
                # the dry run's 2 tokens: one chunk per token, and all in one
                chunks = args.linear_chunks or ([1, base_chunk] if args.dry_run
                                                else [max(16, base_chunk // 4), base_chunk])
                entry = dict(shard=v, tokens=n, hidden=args.hidden, default_chunk=base_chunk, chunks=chunks,
                             methods=[], notes=[], repeats_done=0)
                report["linear"].append(entry)
                overrides.active = dict(report["launch_picks"].get(str(v), {}))
                linear_bench(device, n, args.hidden, v, k, chunks, args.repeats, args.warmup, timer, group, entry,
                             report.save, t_start + args.budget_s - 5.0)
                stage(f"output layer V/tp={v}", t0)
                _print_linear(entry)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        overrides.restore()
    teardown_parallel()
    report["stage_seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    report["complete"] = True
    report.save()
    return report


def _method_rows(methods, times, n, v, device):
    rows = []
    for name, fn, est, backend, note in methods:
        rows.append(dict(method=name, estimator=est, backend=backend, ms=statistics.median(times[name]) * 1e3,
                         peak_extra_bytes=None, peak_extra_vs_logits=None, note=note))
    base = next((r["ms"] for r in rows if r["method"] == "megatron fused CE"), None)
    for r in rows:
        r["vs_megatron_fused"] = r["ms"] / base if base else None
        r["eff_TBps_6B"] = 6 * n * v / (r["ms"] / 1e3) / 1e12
        est = r["estimator"]
        if device.type != "cuda":
            continue  # interpreter timings say nothing about speed
        if r["backend"] == "triton" and est in TARGETS and r["vs_megatron_fused"] is not None:
            r["target"] = TARGETS[est]
            r["meets_target"] = r["vs_megatron_fused"] <= TARGETS[est]
    return rows


def _fmt(x, spec):
    width = "".join(c for c in spec if c.isdigit() or c == ".").split(".")[0]
    return format("-", ">" + width) if x is None else format(x, spec)


def _print_shard(n, v, rows, kernels):
    print(f"\nN={n}  V/tp={v}  bf16  forward+backward", flush=True)
    print(f"{'method':<34}{'ms':>9}{'x fused CE':>12}{'TB/s@6B':>9}{'peak/logits':>12}  target")
    for r in rows:
        tgt = ""
        if "meets_target" in r:
            tgt = f"<= {r['target']:.2f}x {'PASS' if r['meets_target'] else 'FAIL'}"
        print(f"{r['method']:<34}{r['ms']:>9.3f}{_fmt(r['vs_megatron_fused'], '>12.3f')}"
              f"{r['eff_TBps_6B']:>9.2f}{_fmt(r['peak_extra_vs_logits'], '>12.3f')}  {tgt}")
    print(f"{'kernel':<44}{'ms':>9}{'TB/s':>8}{'x copy':>8}  regs/spills")
    for kr in kernels:
        extra = ""
        if "share_of_sample_estimator" in kr:
            extra = f"  {kr['share_of_sample_estimator']:.1%} of the sample estimator"
        regs = kr["regs"] or {}
        print(f"{kr['kernel']:<44}{kr['ms']:>9.3f}{_fmt(kr['tbps'], '>8.2f')}{_fmt(kr['frac_copy'], '>8.2f')}"
              f"  {regs.get('n_regs', '-')}/{regs.get('n_spills', '-')}{extra}", flush=True)


def main(argv=None) -> int:
    """Exit status: 0, 3 if a required baseline is missing, 4 if the CUDA-graph check failed."""
    args = _parse(argv)
    report = run(args)
    for note in report["notes"]:
        print("note:", note)
    for err in report["errors"]:
        print("error:", err, flush=True)
    print(f"\nwrote {args.out}", flush=True)
    if report["baselines_missing"]:
        return 3
    return 4 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
