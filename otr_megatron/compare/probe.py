"""Answer-position distributions of the warm start and of each tuned model, in one process.

``python -m otr_megatron.compare.probe SPEC.json`` (the harness writes SPEC): builds the model with
the train job's own `Trainer` (TP=PP=DP=1, one gloo rank), loads the warm-start checkpoint and then
each run's final checkpoint through the job's `load_checkpoint`, and runs every evaluation split.
Per split and run, over the response tokens of the split (real vocabulary, float64):

* ``kl_answer``: mean over samples of KL(base || tuned) at the first response token (the answer
  position); ``rkl_answer`` the reverse KL(tuned || base); ``kl_response``: mean over every response
  token.
* ``base_mode_mass``: mean tuned probability of the base model's argmax at the answer position
  (how much of the base model's preference survives).
* with an answer rule for the split (``parity_digit``: the prompt is ``P:<n>=``, the correct answers
  are the five digits with n's parity): ``valid_mass`` (probability of a correct answer: accuracy
  when sampling at temperature 1), ``greedy_valid`` (the argmax is a correct answer) and
  ``kl_valid`` (KL(base || tuned) of the two distributions restricted to the correct answers and
  renormalised: how far the preference among correct answers moved, without the wrong answers'
  removal, which dominates ``kl_answer`` once they are gone).
* ``number_forms`` (the prompt is ``N:<n>=``; the correct answers are the 8 surface forms of
  `otr_megatron.data.synthetic.number_forms`, several tokens each, whose choices lie at different
  positions): the same three names at the level of whole responses, from each form's teacher-forced
  probability (every token and the closing EOS): ``valid_mass`` = P(the response is one of the
  forms), ``base_mode_mass`` = P(the base model's most probable form), ``kl_valid`` = KL(base ||
  tuned) over the forms, renormalised. (No ``greedy_valid``: that needs decoding.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import torch

RULES = ("parity_digit", "number_forms")


def valid_ids_parity_digit(prompt: str, tokenizer) -> list[int]:
    """Token ids of the digits with n's parity for a prompt ``P:<n>=`` (single-token digits)."""
    m = re.fullmatch(r"P:(\d+)=", prompt.strip())
    if m is None:
        raise ValueError(f"answer rule parity_digit: prompt {prompt!r} is not of the form 'P:<n>='")
    ids = []
    for d in range(int(m.group(1)) % 2, 10, 2):
        enc = tokenizer.encode(str(d))
        if len(enc) != 1:
            raise ValueError(f"answer rule parity_digit: digit {d} is {len(enc)} tokens, expected one")
        ids.append(enc[0])
    return ids


def number_forms_of(prompt: str) -> list[str]:
    """The correct answers to a prompt ``N:<n>=`` (canonical form first)."""
    from otr_megatron.data.synthetic import number_forms

    m = re.fullmatch(r"N:(\d+)=", prompt.strip())
    if m is None:
        raise ValueError(f"answer rule number_forms: prompt {prompt!r} is not of the form 'N:<n>='")
    return number_forms(int(m.group(1)))


def forms_metrics(lp_base: torch.Tensor, lp_tuned: torch.Tensor) -> dict[str, float]:
    """Whole-response metrics from log-probabilities ``[N, F]`` of each sample's F correct forms."""
    lp_base, lp_tuned = lp_base.double(), lp_tuned.double()
    mode = lp_base.argmax(-1, keepdim=True)
    vb, vt = torch.log_softmax(lp_base, -1), torch.log_softmax(lp_tuned, -1)
    return {"valid_mass": float(lp_tuned.exp().sum(-1).mean()),
            "base_mode_mass": float(lp_tuned.gather(-1, mode).exp().mean()),
            "kl_valid": float((vb.exp() * (vb - vt)).sum(-1).mean())}


def sample_logprobs(trainer, ds) -> torch.Tensor:
    """log P(response | prompt) per sample of `ds` (sum over its supervised tokens, EOS included), float64."""
    out = torch.zeros(ds.num_samples, dtype=torch.float64)
    for lp, b in _response_logprobs(trainer, ds):
        sel = b["loss_mask"] > 0
        out.index_add_(0, b["sample_ids"][sel], lp.gather(-1, b["labels"][sel].unsqueeze(-1)).squeeze(-1))
    return out


def _forms_datasets(trainer, prompts: list[str], tmp: str) -> list:
    """One dataset per surface form (form f of every prompt, in the split's sample order), built as the
    job builds its evaluation splits."""
    from otr_megatron.data.sft import build_sft_dataset

    forms = [number_forms_of(p) for p in prompts]
    out = []
    for f in range(len(forms[0])):
        path = os.path.join(tmp, f"form{f}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"prompt": p, "response": fs[f]}) + "\n" for p, fs in zip(prompts, forms))
        ds = build_sft_dataset([path], trainer.tokenizer, trainer.cfg.data.seq_length, name=f"form{f}", verbose=False)
        if ds.stats.truncated:
            raise ValueError(f"answer rule number_forms: form {f} does not fit seq_length={trainer.cfg.data.seq_length}")
        out.append(ds)
    return out


def distribution_metrics(lp_base: torch.Tensor, lp_tuned: torch.Tensor, first: torch.Tensor,
                         valid: list[list[int]] | None = None) -> dict[str, float]:
    """Metrics from log-probabilities ``[N, V]`` at the N response positions of one split (same
    positions, same order); `first` indexes each sample's answer position; `valid` (optional) lists
    the correct answer ids of each sample."""
    lp_base, lp_tuned = lp_base.double(), lp_tuned.double()
    p_b, p_t = lp_base.exp(), lp_tuned.exp()
    kl = (p_b * (lp_base - lp_tuned)).sum(-1)
    rkl = (p_t * (lp_tuned - lp_base)).sum(-1)
    fb, ft = lp_base[first], lp_tuned[first]
    mode = fb.argmax(-1, keepdim=True)
    out = {
        "kl_answer": float(kl[first].mean()),
        "rkl_answer": float(rkl[first].mean()),
        "kl_response": float(kl.mean()),
        "base_mode_mass": float(ft.exp().gather(-1, mode).mean()),
    }
    if valid is not None:
        if len(valid) != len(first):
            raise ValueError(f"valid: {len(valid)} answer sets for {len(first)} samples")
        mask = torch.zeros_like(ft, dtype=torch.bool)
        for i, ids in enumerate(valid):
            mask[i, ids] = True
        out["valid_mass"] = float((ft.exp() * mask).sum(-1).mean())
        out["greedy_valid"] = float(mask.gather(-1, ft.argmax(-1, keepdim=True)).double().mean())
        # KL(base || tuned) between the two distributions restricted to the correct answers and
        # renormalised: which correct answer is preferred, without the removal of wrong answers.
        neg = torch.tensor(float("-inf"), dtype=fb.dtype)
        vb = torch.log_softmax(torch.where(mask, fb, neg), -1)
        vt = torch.log_softmax(torch.where(mask, ft, neg), -1)
        out["kl_valid"] = float(torch.where(mask, vb.exp() * (vb - vt), torch.zeros_like(vb)).sum(-1).mean())
    return out


@torch.no_grad()
def _response_logprobs(trainer, ds):
    """Per micro-batch of `ds`: (log-probs [n, V] over the real vocabulary at its n response positions,
    float64 on the CPU, and the batch). The model is in eval mode meanwhile."""
    from otr_megatron.mcore.hook import unwrap_model

    vocab = trainer.tokenizer.vocab_size
    model = unwrap_model(trainer.model[0])
    model.eval()
    dev = next(model.parameters()).device
    mbs = trainer.cfg.micro_batch_size
    try:
        for start in range(0, len(ds), mbs):
            b = ds.collate(list(range(start, min(start + mbs, len(ds)))))
            logits = model(b["tokens"].to(dev), b["position_ids"].to(dev),
                           None if b["attention_mask"] is None else b["attention_mask"].to(dev))
            sel = b["loss_mask"] > 0
            yield torch.log_softmax(logits.float()[..., :vocab][sel.to(dev)].double(), dim=-1).cpu(), b
    finally:
        model.train()


def split_logprobs(trainer, name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(log-probs [N, V] at every response position, index of each sample's first one, sample ids)."""
    lps, sids, pos = [], [], []
    for lp, b in _response_logprobs(trainer, trainer.eval_data[name]):
        sel = b["loss_mask"] > 0
        lps.append(lp)
        sids.append(b["sample_ids"][sel])
        pos.append(b["position_ids"][sel])
    lp, sid, p = torch.cat(lps), torch.cat(sids), torch.cat(pos)
    order = torch.argsort(sid * (int(p.max()) + 1) + p)  # by sample, then position
    lp, sid = lp[order], sid[order]
    uniq, first = [], []
    for i, s in enumerate(sid.tolist()):
        if not uniq or uniq[-1] != s:
            uniq.append(s)
            first.append(i)
    return lp, torch.tensor(first, dtype=torch.long), uniq


def _prompt_of(ds, tokenizer, i: int) -> str:
    """Text before sample i's first response token (BOS and other special ids dropped)."""
    j = int(ds.loss_mask[i].nonzero()[0][0])
    return tokenizer.decode(ds.tokens[i][: j + 1])


def _checkpoint_of(run_dir: str) -> str:
    from otr_megatron.train import checkpoint as ck

    return ck.select_checkpoint(os.path.join(run_dir, "checkpoints"))[0]


def run_probe(spec: dict) -> dict:
    """spec: config (warm-start YAML), base (run dir), runs {name: run dir}, rules {split: rule}."""
    import tempfile

    from otr_megatron.distributed import free_port, teardown_parallel
    from otr_megatron.train.checkpoint import load_checkpoint
    from otr_megatron.train.config import load_config
    from otr_megatron.train.trainer import Trainer

    use_cuda = torch.cuda.is_available() and spec.get("device", "auto") != "cpu"
    if not use_cuda:
        from otr_megatron.mcore.cpu_backend import enable_cpu_mode

        enable_cpu_mode(force=True)
    tmp = tempfile.mkdtemp(prefix="otr-compare-probe-")
    cfg = load_config(spec["config"], ["tp=1", "pp=1", "dp=1", f"output_dir={tmp}", "resume=false",
                                       "finetune_iters=0"])
    for split, rule in spec.get("rules", {}).items():
        if rule not in RULES:
            raise ValueError(f"answer rule {rule!r} for split {split!r}; expected one of {RULES}")
        if split not in cfg.data.eval:
            raise ValueError(f"answer rule for split {split!r}, but the evaluation splits are {sorted(cfg.data.eval)}")
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", rank=0, world_size=1,
                                         init_method=f"tcp://127.0.0.1:{free_port()}")
    results: dict = {}
    try:
        tr = Trainer(cfg)
        tr.setup()
        it = load_checkpoint(tr, _checkpoint_of(spec["base"]))
        base = {s: split_logprobs(tr, s) for s in tr.eval_data}
        valid, forms = {}, {}
        for s, rule in spec.get("rules", {}).items():
            ds = tr.eval_data[s]
            prompts = [_prompt_of(ds, tr.tokenizer, i) for i in base[s][2]]
            if rule == "parity_digit":
                valid[s] = [valid_ids_parity_digit(p, tr.tokenizer) for p in prompts]
            else:
                forms[s] = _forms_datasets(tr, prompts, tmp)

        def forms_lp(s):
            return torch.stack([sample_logprobs(tr, d) for d in forms[s]], -1)

        base_forms = {s: forms_lp(s) for s in forms}
        runs = {"__warm_start__": spec["base"], **spec["runs"]}
        for name, run_dir in runs.items():
            it = load_checkpoint(tr, _checkpoint_of(run_dir)) if name != "__warm_start__" else it
            rec = {"iteration": it}
            for s in tr.eval_data:
                lp, first, sids = split_logprobs(tr, s) if name != "__warm_start__" else base[s]
                if sids != base[s][2]:
                    raise RuntimeError(f"split {s}: sample order differs between the base and {name}")
                for k, v in distribution_metrics(base[s][0], lp, first, valid.get(s)).items():
                    rec[f"{s}/{k}"] = v
                if s in forms:  # whole-response metrics replace the answer-position ones of the same name
                    lpf = forms_lp(s) if name != "__warm_start__" else base_forms[s]
                    rec.update({f"{s}/{k}": v for k, v in forms_metrics(base_forms[s], lpf).items()})
            results[name] = rec
            print(f"probe {name} (iteration {it}): " + " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                                                                  if k != "iteration"), flush=True)
    finally:
        teardown_parallel()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m otr_megatron.compare.probe SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    results = run_probe(spec)
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, spec["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
