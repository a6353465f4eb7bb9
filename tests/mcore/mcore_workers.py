"""Per-rank bodies of the multi-process megatron-core tests (module-level so spawn can import them).

Each returns plain data; the pytest side asserts, so a failure names the layout and the number.
"""

from __future__ import annotations

import torch

# padded vocab 64 in every TP layout (so the embedding has the same global shape); real vocab 60
TINY = dict(vocab_size=60, make_vocab_size_divisible_by=32, seq_length=16, hidden_size=32,
            num_layers=4, num_attention_heads=4)

LAYOUTS = {
    "tp2_dp2": dict(tp=2),
    "tp2_sp_dp2": dict(tp=2, sp=True),
    "pp2_dp2_1f1b": dict(pp=2),
    "tp2_pp2": dict(tp=2, pp=2),
    "pp2_vp2_dp2_interleaved": dict(pp=2, vp=2),
    "cp2_dp2_zigzag_sim": dict(cp=2),
}
STEPS = 3


def _rel_err(local, ref):
    from tests import harness as T

    errs = T.compare_to_global(local, ref)
    scale = max(float(t.abs().max()) for t in ref.values())
    return max(errs.values()) / scale, scale


# normalization="sequence" (rows of different supervised lengths, weighted 1/length) in the layouts
# that split the loss differently: DP + micro-batches, pipeline, CP zigzag
SEQUENCE_LAYOUTS = ("tp2_dp2", "pp2_dp2_1f1b", "cp2_dp2_zigzag_sim")


def layouts_worker(rank, world, estimators):
    """Reference single-model run vs every layout, for each estimator ("name:sequence" = per-sequence,
    "name+fused" = the fused output layer in every layout against the unfused reference)."""
    import dataclasses

    import otr_megatron as otr
    from tests import harness as T

    report = {}
    for est in estimators:
        spec, _, norm = est.partition(":")
        name, _, fused = spec.partition("+")
        ocfg = otr.OTRConfig(num_samples=4, temperature=1.3, neg_reward=-0.1, estimator=name, seed=7,
                             normalization=norm or "token")
        T.init_parallel(1, 1)
        ref = T.reference_run(TINY, ocfg, steps=STEPS, batch_size=4)
        if fused:
            ocfg = dataclasses.replace(ocfg, fuse_output_layer=True, fused_chunk_tokens=12)
        runs = dict(LAYOUTS)
        runs["tp2_dp2_full_recompute"] = dict(tp=2)
        if norm:
            runs = {k: v for k, v in runs.items() if k in SEQUENCE_LAYOUTS}
        for name, lay in runs.items():
            cfg = dict(TINY, recompute_granularity="full") if "recompute" in name else TINY
            res = T.run_layout(cfg, ocfg, steps=STEPS, batch_size=4, **lay)
            gerr = max(_rel_err(res["grads"][i], ref["grads"][i])[0] for i in range(STEPS))
            entry = {"grad_rel_err": gerr}
            if res["last_stage"]:
                entry["loss"] = res["loss"]
                entry["metrics"] = res["metrics"]
            report[(est, name)] = entry
        report[(est, "reference")] = {"loss": ref["loss"], "metrics": ref["metrics"]}
    return report


def api_worker(rank, world):
    """TP=2 checks of the hook's contract and error messages; returns {check: value}."""
    import otr_megatron as otr
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from otr_megatron.mcore import hook as H
    from tests import harness as T
    from otr_megatron.mcore.model import build_model_chunks, layout_invariant_init_
    from otr_megatron.mcore.training import loss_func, prepare_batch

    out = {}
    ocfg = otr.OTRConfig(num_samples=8, temperature=1.3, neg_reward=-0.1, estimator="sample", seed=3)
    T.init_parallel(2, 1)
    cfg = dict(TINY, tensor_model_parallel_size=2)
    (m,) = build_model_chunks(cfg)
    layout_invariant_init_([m], 11)
    keys_before = sorted(m.state_dict().keys())
    ddp = DistributedDataParallel(m.config, DistributedDataParallelConfig(), m)
    hook = H.enable_otr(ddp, ocfg)  # unwraps DDP
    out["unwrapped"] = H.get_otr_hook(ddp) is hook and H.get_otr_hook(m) is hook
    out["state_dict_unchanged"] = sorted(m.state_dict().keys()) == keys_before
    out["real_vocab"] = hook.vocab_size
    batch = T.synthetic_batch(0, 2, 16, 60, seed=5)

    def expect(exc, fn, *words):
        try:
            fn()
        except exc as e:
            return all(w in str(e) for w in words)
        return False

    fwd = lambda b: m(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    full = dict(batch, position_ids=torch.arange(16)[None].expand(2, 16))
    out["no_context_error"] = expect(RuntimeError, lambda: fwd(full), "set_otr_context")
    b = prepare_batch(batch, m)
    loss = fwd(b)
    out["masked_tokens_zero"] = bool((loss[b["loss_mask"] == 0] == 0).all())
    stats = H.pop_otr_stats(m)
    out["stats_popped_once"] = H.pop_otr_stats(m) is None
    out["stats_keys"] = sorted(stats)
    ls, n, rep = loss_func(b["loss_mask"], loss, stats, 8)
    out["report_keys"] = sorted(rep)
    out["num_tokens"] = int(n) == int(b["loss_mask"].sum())
    # "lm loss" is the label cross entropy over the real vocabulary: float64 from the gathered logits
    shard = m(b["tokens"], b["position_ids"], None).double()  # [b, s, V/tp]
    parts = [torch.empty_like(shard) for _ in range(world)]
    torch.distributed.all_gather(parts, shard.contiguous())
    logp = torch.cat(parts, dim=-1)[..., :60].log_softmax(-1)
    ce = -logp.gather(-1, b["labels"][..., None]).squeeze(-1)
    out["lm_loss_is_label_ce"] = (float(rep["lm loss"][0]), float((ce * b["loss_mask"]).sum()))
    out["otr_loss_is_backpropagated"] = bool(torch.equal(rep["otr loss"], torch.stack([ls, n.float()])))
    # same context, second forward: same loss (context is not consumed; what recompute relies on)
    out["repeatable"] = bool(torch.equal(fwd(b), loss))
    # a different step gives different samples
    H.set_otr_context(m, H.OTRBatchContext(step=1, token_keys=b["token_keys"], loss_mask=b["loss_mask"]))
    out["step_changes_samples"] = not torch.equal(fwd(b), loss)
    H.set_otr_context(m, H.OTRBatchContext(step=0, token_keys=b["token_keys"][:1], loss_mask=b["loss_mask"][:1]))
    out["stale_context_error"] = expect(ValueError, lambda: fwd(b), "token_keys", "another micro-batch")
    H.set_otr_context(m, H.OTRBatchContext(step=0, token_keys=b["token_keys"], loss_mask=b["loss_mask"]))
    logits = m(b["tokens"], b["position_ids"], None)  # [b, s, V/tp]
    gathered = torch.cat([logits, logits], dim=-1).transpose(0, 1).contiguous()
    out["gathered_logits_error"] = expect(
        ValueError, lambda: hook.loss_from_logits(m, b["labels"], gathered), "padded vocab")
    out["vocab_too_big_error"] = expect(ValueError, lambda: H.enable_otr(m, ocfg, vocab_size=65), "vocab_size=65")
    out["bad_keys_error"] = expect(ValueError, lambda: H.OTRBatchContext(step=0, token_keys=b["token_keys"].float()),
                                   "token_keys", "int64")
    out["not_a_context_error"] = expect(TypeError, lambda: H.set_otr_context(m, {"step": 0}), "OTRBatchContext")
    # the output_processor route (0.18+) gives the same per-token loss
    if H.output_processor_supported():
        hook2 = H.enable_otr(m, ocfg)
        H.set_otr_context(m, H.OTRBatchContext(step=0, token_keys=b["token_keys"], loss_mask=b["loss_mask"]))
        via_proc = m(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"],
                     output_processor=H.make_output_processor(m))
        out["output_processor_equal"] = bool(torch.allclose(via_proc, loss, rtol=0, atol=1e-6))
        assert hook2 is H.get_otr_hook(m)
    else:
        out["output_processor_equal"] = "unsupported"
    # disable_otr restores Megatron's cross entropy
    H.disable_otr(m)
    ce = fwd(b)
    ref_ce = T.megatron_ce_loss_fn(m(b["tokens"], b["position_ids"], None).transpose(0, 1).contiguous(),
                                   b["labels"].t().contiguous()).t()
    out["disable_restores_ce"] = bool(torch.allclose(ce, ref_ce, atol=1e-5))

    # MTP: default CE on the MTP head (one OTR call per forward), opt-in OTR (two calls)
    T.init_parallel(2, 1)
    (mm,) = build_model_chunks(dict(cfg, mtp_num_layers=1))
    layout_invariant_init_([mm], 11)
    calls = []

    def counting(*a, **k):
        calls.append(k.get("cfg", a[2] if len(a) > 2 else None))
        return otr.vocab_parallel_otr_loss(*a, **k)

    for mode in ("ce", "otr"):
        calls.clear()
        H.enable_otr(mm, ocfg, mtp_loss=mode, loss_fn=counting)
        bb = prepare_batch(batch, mm)
        mm(bb["tokens"], bb["position_ids"], None, labels=bb["labels"], loss_mask=bb["loss_mask"])
        out[f"mtp_{mode}_otr_calls"] = len(calls)
        out[f"mtp_{mode}_seeds"] = sorted({c.seed for c in calls})
    return out


def fused_worker(rank, world):
    """TP=2: the fused output layer (`fuse_output_layer=True`) against the unfused hook on the same model
    and batch, per variant: loss and every parameter's gradient (max relative error), plus the routes
    that must stay Megatron's (no labels: real logits) and the settings it refuses."""
    import dataclasses

    import otr_megatron as otr
    from otr_megatron.mcore import hook as H
    from tests import harness as T
    from otr_megatron.mcore.model import build_model_chunks, layout_invariant_init_
    from otr_megatron.mcore.training import prepare_batch

    out = {}
    base = otr.OTRConfig(num_samples=8, estimator="sample", seed=3)
    fused_cfg = dataclasses.replace(base, fuse_output_layer=True, fused_chunk_tokens=6)
    batch = T.synthetic_batch(0, 2, 16, 60, seed=5)
    variants = {"plain": {}, "sp": dict(sequence_parallel=True), "tied": dict(share_embeddings_and_output_weights=True),
                "tied_sp": dict(share_embeddings_and_output_weights=True, sequence_parallel=True),
                "mtp_ce": dict(mtp_num_layers=1), "mtp_otr": dict(mtp_num_layers=1)}
    for name, extra in variants.items():
        T.init_parallel(2, 1)
        (m,) = build_model_chunks(dict(TINY, tensor_model_parallel_size=2, **extra))
        layout_invariant_init_([m], 11)
        mtp = "otr" if name == "mtp_otr" else "ce"
        runs = []
        for cfg in (base, fused_cfg):
            H.enable_otr(m, cfg, mtp_loss=mtp)
            m.zero_grad(set_to_none=True)
            b = prepare_batch(batch, m)
            loss = m(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
            stats = H.pop_otr_stats(m)
            (loss * b["loss_mask"]).sum().backward()
            grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
            runs.append((loss.detach(), stats["hits"], grads))
        (l0, h0, g0), (l1, h1, g1) = runs
        assert set(g0) == set(g1), (name, set(g0) ^ set(g1))
        out[name] = {
            "loss_err": float((l0 - l1).abs().max()),
            "hits_equal": bool(torch.equal(h0, h1)),
            "grad_rel_err": max(float((g0[k] - g1[k]).abs().max() / g0[k].abs().max().clamp(min=1e-12)) for k in g0),
            "n_grads": len(g0),
        }
        if name == "tied":
            emb = [k for k in g0 if "word_embeddings" in k]
            out["tied_output_layer_has_no_weight"] = not any("output_layer.weight" in k for k in g0) and bool(emb)
        if name == "plain":
            # no labels: Megatron's own output layer gives the logits
            logits = m(b["tokens"], b["position_ids"], None)
            H.disable_otr(m)
            out["no_labels_gives_logits"] = bool(torch.equal(logits, m(b["tokens"], b["position_ids"], None)))
            out["disable_restores_output_layer"] = "forward" not in m.output_layer.__dict__
            try:
                H.enable_otr(m, fused_cfg, loss_fn=otr.vocab_parallel_otr_loss)
                out["loss_fn_refused"] = False
            except ValueError as e:
                out["loss_fn_refused"] = "loss_fn" in str(e)
            if H.output_processor_supported():
                H.enable_otr(m, fused_cfg)
                H.set_otr_context(m, H.OTRBatchContext(step=0, token_keys=b["token_keys"], loss_mask=b["loss_mask"]))
                via = m(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"],
                        output_processor=H.make_output_processor(m))
                out["output_processor_fused_err"] = float((via.detach() - l0).abs().max())
            else:
                out["output_processor_fused_err"] = "unsupported"
    return out
