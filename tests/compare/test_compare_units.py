"""`otr-megatron compare` pieces without training: grid, warm-start sharing, probe metrics against an
independent reference, report statistics, the A/B data generator and the shipped study config."""

import json
import math
import os
import statistics

import numpy as np
import pytest
import torch
import yaml

from otr_megatron.compare import cli as compare_cli
from otr_megatron.compare.grid import build_plan, parse_losses, parse_seeds, parse_sweep
from otr_megatron.compare.probe import distribution_metrics, forms_metrics, number_forms_of, valid_ids_parity_digit
from otr_megatron.compare.report import WARM, fmt_paired, frontier_gap, markdown, paired_stats, summarize, t975
from otr_megatron.data.tokenizer import ByteTokenizer
from otr_megatron.train.config import ConfigError, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "eval":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# -- grid ------------------------------------------------------------------------------------------


def test_parse_sweep_values_labels_and_errors():
    s = parse_sweep("finetune_lr=3e-4,1e-3")
    assert s.key == "finetune_lr" and s.values == (3e-4, 1e-3) and s.labels == ("3e-4", "1e-3")
    s = parse_sweep("data.train=assets:ab_parity_fixed.jsonl,/x/y/mine.jsonl")
    assert s.labels == ("ab_parity_fixed", "mine")
    s = parse_sweep("data.train=[[a.jsonl, b.jsonl], c.jsonl]")
    assert s.values == (["a.jsonl", "b.jsonl"], "c.jsonl") and s.labels == ("a+b", "c")
    for bad, word in (("finetune_lr", "KEY=V1"), ("loss=sft,otr", "--losses"), ("seed=1,2", "--seeds"),
                      ("x=", "at least one"), ("data.train=a/x.jsonl,b/x.jsonl", "different names")):
        with pytest.raises(ConfigError, match=word):
            parse_sweep(bad)
    with pytest.raises(ConfigError, match="subset of"):
        parse_losses("sft,ppo")
    with pytest.raises(ConfigError, match="twice"):
        parse_losses("sft,sft")
    assert parse_seeds("3,1") == [3, 1]
    with pytest.raises(ConfigError, match="integers"):
        parse_seeds("1,a")


def test_plan_shares_one_warm_start_per_seed_and_arms_differ_only_in_the_grid(tmp_path):
    sweeps = [parse_sweep("data.train=assets:ab_parity_fixed.jsonl,assets:ab_parity_uniform.jsonl"),
              parse_sweep("finetune_lr=3e-4,1e-3"), parse_sweep("otr.temperature=1.0,1.3")]
    plan = build_plan(str(tmp_path), None, compare_cli._ab_overrides(), ["sft", "otr"], [1, 2], sweeps)
    assert len(plan.arms) == 2 * 2 * 2 * 2
    # sft does not read kappa: its temperature=1.3 arms share the temperature=1.0 arms' runs
    assert len(plan.runs) == 2 * (len(plan.arms) - 4) and len(plan.shared) == 2 * 4
    for arm, run in plan.shared:
        assert arm.loss == run.arm.loss == "sft" and arm.name.endswith("temperature=1.3")
        assert run.arm.name == arm.name.replace("temperature=1.3", "temperature=1.0")
    assert [w.seed for w in plan.warm_starts] == [1, 2]  # every knob here acts after the warm start
    assert len({w.family for w in plan.warm_starts}) == 1
    for w in plan.warm_starts:
        assert w.cfg.finetune_iters == 0 and w.cfg.pretrain_iters == 800 and w.cfg.seed == w.seed
        assert len(w.runs) == len(plan.arms) - 4
    swept = {"loss", "data.train", "finetune_lr", "otr.temperature", "output_dir"}
    runs = plan.warm_starts[0].runs
    ref = _flat(to_dict(runs[0].cfg))
    for r in runs:
        d = _flat(to_dict(r.cfg))
        assert {k for k in d if d[k] != ref[k]} <= swept, r.arm.name
        assert r.cfg.resume and not r.cfg.progress_bar and r.dir.endswith(r.arm.name)
    assert runs[0].arm.name == "sft__train=ab_parity_fixed__finetune_lr=3e-4__temperature=1.0"


def test_vary_moves_one_knob_at_a_time_and_runs_an_arm_only_for_losses_that_read_it(tmp_path):
    varies = [parse_sweep("otr.num_samples=4,32", option="--vary"),
              parse_sweep("otr.temperature=1.0,1.3,2.0", option="--vary")]
    plan = build_plan(str(tmp_path), None, compare_cli._ab_overrides() + ["otr.num_samples=32"],
                      ["sft", "otr-expected", "otr"], [1], [parse_sweep("finetune_lr=1e-4,3e-4")], varies)
    # per learning rate: the base point, K=4, kappa=1.0, kappa=2.0 (K=32 and kappa=1.3 are the base)
    panels = list(dict.fromkeys(a.panel for a in plan.arms))
    assert panels[:4] == ["finetune_lr=1e-4", "finetune_lr=1e-4, num_samples=4", "finetune_lr=1e-4, temperature=1.0",
                          "finetune_lr=1e-4, temperature=2.0"] and len(panels) == 8
    ran = {r.arm.name for r in plan.runs}
    assert "otr__finetune_lr=1e-4__num_samples=4" in ran and "otr-expected__finetune_lr=1e-4__temperature=2.0" in ran
    assert "sft__finetune_lr=1e-4__temperature=2.0" not in ran and "otr-expected__finetune_lr=1e-4__num_samples=4" not in ran
    assert len(plan.runs) == 2 * (1 + 3 + 4)  # sft once, otr-expected at 3 kappas, otr at all 4 points
    for r in plan.runs:
        moved = {k: v for k, v, _, _ in r.arm.knobs}
        assert r.cfg.otr.num_samples == moved.get("otr.num_samples", 32)
        assert r.cfg.otr.temperature == moved.get("otr.temperature", 1.3)
    shared = {a.name: r.arm.name for a, r in plan.shared}
    assert shared["sft__finetune_lr=3e-4__temperature=1.0"] == "sft__finetune_lr=3e-4"
    assert shared["otr-expected__finetune_lr=3e-4__num_samples=4"] == "otr-expected__finetune_lr=3e-4"
    with pytest.raises(ConfigError, match="given twice"):
        build_plan(str(tmp_path), None, [], ["sft"], [1], [parse_sweep("otr.beta=0,1")],
                   [parse_sweep("otr.beta=0,1", option="--vary")])
    with pytest.raises(ConfigError, match="--vary"):
        parse_sweep("otr.neg_reward", option="--vary")


def test_sft_and_dft_do_not_read_the_otr_knobs_they_share_runs_over(tmp_path):
    """The sharing rule's premise, on the core loss: sft/dft give the same loss and gradient at any K,
    kappa, beta; otr-expected at any K."""
    import torch

    from otr_megatron import OTRConfig, vocab_parallel_otr_loss
    from otr_megatron.compare.grid import IGNORED_BY_LOSS
    from otr_megatron.train.config import LOSS_TO_ESTIMATOR

    torch.manual_seed(0)
    logits = torch.randn(6, 2, 40, dtype=torch.float64)
    labels = torch.randint(0, 40, (6, 2))
    knobs = {"otr.num_samples": (4, 64), "otr.temperature": (0.7, 2.0), "otr.neg_reward": (0.0, -1.0)}
    for loss, ignored in IGNORED_BY_LOSS.items():
        outs = []
        for i in range(2):
            kw = {k.split(".")[1]: v[i] for k, v in knobs.items() if k in ignored}
            x = logits.clone().requires_grad_(True)
            val = vocab_parallel_otr_loss(x, labels, OTRConfig(estimator=LOSS_TO_ESTIMATOR[loss], **kw)).sum()
            val.backward()
            outs.append((val.detach(), x.grad))
        if ignored:
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), loss


def test_plan_gives_a_knob_that_changes_the_warm_start_its_own_warm_start(tmp_path):
    plan = build_plan(str(tmp_path), None, compare_cli._ab_overrides(), ["sft"], [1],
                      [parse_sweep("pretrain_lr=1e-3,2e-3")])
    assert len(plan.warm_starts) == 2
    assert {w.cfg.pretrain_lr for w in plan.warm_starts} == {1e-3, 2e-3}
    assert len({w.dir for w in plan.warm_starts}) == 2
    with pytest.raises(ConfigError, match="pretrain_iters"):
        build_plan(str(tmp_path), None, ["pretrain_iters=0"], ["sft"], [1], [])
    with pytest.raises(ConfigError, match="no_such_key"):
        build_plan(str(tmp_path), None, ["no_such_key=1"], ["sft"], [1], [])


# -- probe metrics ---------------------------------------------------------------------------------


def test_distribution_metrics_match_an_independent_reference():
    from scipy.stats import entropy

    g = torch.Generator().manual_seed(0)
    n_pos, vocab = 9, 12
    lb = torch.log_softmax(torch.randn(n_pos, vocab, generator=g, dtype=torch.float64) * 2, -1)
    lt = torch.log_softmax(torch.randn(n_pos, vocab, generator=g, dtype=torch.float64) * 2, -1)
    first = torch.tensor([0, 3, 7])
    valid = [[1, 2, 5], [0], [4, 11]]
    got = distribution_metrics(lb, lt, first, valid)
    pb, pt = np.exp(lb.double().numpy()), np.exp(lt.double().numpy())
    kl = [entropy(pb[i], pt[i]) for i in range(n_pos)]
    rkl = [entropy(pt[i], pb[i]) for i in range(n_pos)]
    f = first.tolist()
    assert got["kl_answer"] == pytest.approx(np.mean([kl[i] for i in f]), rel=1e-10)
    assert got["rkl_answer"] == pytest.approx(np.mean([rkl[i] for i in f]), rel=1e-10)
    assert got["kl_response"] == pytest.approx(np.mean(kl), rel=1e-10)
    assert got["base_mode_mass"] == pytest.approx(np.mean([pt[i][np.argmax(pb[i])] for i in f]), rel=1e-10)
    assert got["valid_mass"] == pytest.approx(np.mean([pt[i][v].sum() for i, v in zip(f, valid)]), rel=1e-10)
    assert got["greedy_valid"] == pytest.approx(np.mean([np.argmax(pt[i]) in v for i, v in zip(f, valid)]))
    kv = [entropy(pb[i][v] / pb[i][v].sum(), pt[i][v] / pt[i][v].sum()) for i, v in zip(f, valid)]
    assert got["kl_valid"] == pytest.approx(np.mean(kv), rel=1e-10)
    same = distribution_metrics(lb, lb, first, valid)
    assert same["kl_answer"] == pytest.approx(0.0, abs=1e-12) and same["kl_response"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="answer sets"):
        distribution_metrics(lb, lt, first, valid[:2])


def test_parity_rule():
    tok = ByteTokenizer()
    assert valid_ids_parity_digit("P:4821=", tok) == [ord(c) for c in "13579"]
    assert valid_ids_parity_digit("P:10=", tok) == [ord(c) for c in "02468"]
    with pytest.raises(ValueError, match="P:<n>="):
        valid_ids_parity_digit("rev:abc=", tok)


def test_number_forms_rule_and_whole_response_metrics_match_a_direct_computation():
    assert number_forms_of("N:12345=") == ["12345 pts", "pts 12345", "12345 points", "points 12345",
                                           "12,345 pts", "pts 12,345", "12,345 points", "points 12,345"]
    with pytest.raises(ValueError, match="N:<n>="):
        number_forms_of("P:12=")
    g = torch.Generator().manual_seed(3)
    lp_b = torch.log(torch.rand(5, 8, generator=g, dtype=torch.float64) / 9)  # masses sum below 1: some elsewhere
    lp_t = torch.log(torch.rand(5, 8, generator=g, dtype=torch.float64) / 9)
    m = forms_metrics(lp_b, lp_t)
    pb, pt = lp_b.exp().numpy(), lp_t.exp().numpy()
    assert m["valid_mass"] == pytest.approx(pt.sum(1).mean(), rel=1e-12)
    assert m["base_mode_mass"] == pytest.approx(pt[np.arange(5), pb.argmax(1)].mean(), rel=1e-12)
    qb, qt = pb / pb.sum(1, keepdims=True), pt / pt.sum(1, keepdims=True)
    assert m["kl_valid"] == pytest.approx((qb * np.log(qb / qt)).sum(1).mean(), rel=1e-10)
    assert forms_metrics(lp_b, lp_b)["kl_valid"] == pytest.approx(0, abs=1e-12)


# -- report ----------------------------------------------------------------------------------------


def test_paired_intervals_are_student_t_and_shown_only_when_they_exclude_zero():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(60) == pytest.approx(2.000, abs=2e-3) and t975(10_000) == pytest.approx(1.960, abs=1e-3)
    half = 4.303 / math.sqrt(3)  # std 1, n = 3
    st = paired_stats([1.0, 2.0, 3.0])
    assert st["ci95"] == pytest.approx([2 - half, 2 + half]) and not st["shown"]  # crosses 0
    st = paired_stats([2.0, 3.0, 4.0])
    assert st["ci95"] == pytest.approx([3 - half, 3 + half]) and st["shown"]
    assert fmt_paired(st) == f"**+3.000 ± 1 [{3 - half:+.3f}, {3 + half:+.3f}]**"
    assert paired_stats([-4.0, -3.0, -2.0])["shown"] and not paired_stats([5.0])["shown"]
    assert "**" not in fmt_paired(paired_stats([1.0, 2.0, 3.0]))


def test_frontier_gap_compares_curves_at_equal_x_seed_by_seed():
    """otr's curve is sft's shifted down by 0.2 (plus seed noise that cancels in the pairing): the gap is
    -0.2 at every x of the common range and shown; dft's curve crosses sft's: not shown in the middle."""
    def row(name, pts):  # pts: seed -> [(x, y)] per panel
        return name, pts

    seeds = (1, 2, 3)
    curves = {"sft": lambda x, s: 1.0 + x + 0.1 * s, "otr": lambda x, s: 0.8 + x + 0.1 * s,
              "dft": lambda x, s: 1.0 + x + 0.1 * s + (0.3 * (x - 0.5) if s != 2 else -0.1 * (x - 0.5))}
    xs = {"sft": [0.1, 0.5, 0.9], "otr": [0.2, 0.6, 1.0], "dft": [0.0, 0.5, 1.0]}
    panels = []
    for i in range(3):
        rows = []
        for loss, f in curves.items():
            xv = [xs[loss][i] + 0.01 * s for s in seeds]
            yv = [f(x, s) for x, s in zip(xv, seeds)]
            rows.append({"row": loss, "n": 3, "metrics": {"x": {"seeds": list(seeds), "values": xv},
                                                           "y": {"seeds": list(seeds), "values": yv}}})
        panels.append({"panel": f"lr={i}", "rows": rows, "paired": []})
    gaps = frontier_gap({"panels": panels}, "x", "y", "sft")
    otr = [g for g in gaps if g["loss"] == "otr"]
    assert len(otr) == 5 and otr[0]["x"] == pytest.approx(0.23) and otr[-1]["x"] == pytest.approx(0.91)
    for g in otr:
        assert g["mean"] == pytest.approx(-0.2, abs=1e-9) and g["shown"]
    mid = [g for g in gaps if g["loss"] == "dft"][2]
    assert abs(mid["mean"]) < 0.05 and not mid["shown"]
    for i, p in enumerate(panels):  # panels that are different tasks, not one knob's values: no curve
        p["panel"] = f"train=task{i}"
    assert frontier_gap({"panels": panels}, "x", "y", "sft") == []




def test_summary_mean_std_n_and_paired_differences(tmp_path):
    plan = build_plan(str(tmp_path), None, compare_cli._ab_overrides(), ["sft", "otr"], [1, 2, 3], [])
    vals = {"sft": {1: 0.5, 2: 0.7, 3: 0.6}, "otr": {1: 0.55, 2: 0.8}}
    table = {"all": {WARM: {s: {"a/x": 0.1 * s} for s in (1, 2, 3)},
                     **{loss: {s: {"a/x": v} for s, v in d.items()} for loss, d in vals.items()}}}
    summ = summarize(plan, table, "sft")
    rows = {r["row"]: r for r in summ["panels"][0]["rows"]}
    assert [r["row"] for r in summ["panels"][0]["rows"]] == [WARM, "sft", "otr"]
    st = rows["sft"]["metrics"]["a/x"]
    assert st["mean"] == pytest.approx(0.6) and st["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert st["n"] == 3 and rows["otr"]["metrics"]["a/x"]["n"] == 2
    pd = summ["panels"][0]["paired"][0]
    assert pd["row"] == "otr - sft"
    assert pd["metrics"]["a/x"]["values"] == pytest.approx([0.05, 0.1]) and pd["metrics"]["a/x"]["n"] == 2
    md = markdown(summ, ["a/x"])
    assert "| sft | 3 | 0.600 ± 0.100 |" in md and "(n=2)" not in md.split("paired")[0].split("| sft")[0]
    assert "| otr | 2 | 0.675 ± 0.177 |" in md


# -- data and shipped study ------------------------------------------------------------------------


def _read(name):
    from otr_megatron.train.config import resolve_path

    with open(resolve_path(f"assets:ab_{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def test_ab_data_assets_are_the_generator_output_and_have_the_designed_properties():
    from otr_megatron.data import synthetic as gen

    splits = gen.ab_splits()
    for name, rows in splits.items():
        assert _read(name) == rows, f"assets:ab_{name}.jsonl differs from otr_megatron.data.synthetic.ab_splits()"
    n = lambda r: int(r["prompt"][2:-1])  # noqa: E731
    fixed, uni, ev = splits["parity_fixed"], splits["parity_uniform"], splits["parity_eval"]
    assert [r["prompt"] for r in fixed] == [r["prompt"] for r in uni]  # paired conditions
    assert all(r["response"] == str(n(r) % 10) for r in fixed)
    assert all(int(r["response"]) % 2 == n(r) % 2 for r in uni)
    # labels of (b) are uniform over the 5 valid digits: last-digit share ~0.2 (binomial, 4000 draws)
    share = np.mean([r["response"] == str(n(r) % 10) for r in uni])
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(uni))
    prior = [r for r in splits["pretrain"] if r["prompt"].startswith("P:")]
    share = np.mean([r["response"] == str(n(r) % 10) for r in prior])  # 0.5 + 0.5 * 0.1 = 0.55
    assert abs(share - 0.55) < 4 * math.sqrt(0.55 * 0.45 / len(prior))
    nums = [set(map(n, rows)) for rows in (prior, fixed, ev)]
    assert not (nums[0] & nums[1]) and not (nums[0] & nums[2]) and not (nums[1] & nums[2])
    old_pre = [r for r in splits["pretrain"] if not r["prompt"].startswith("P:")]
    strings = [{r["prompt"] for r in splits[k]} for k in ("strings_train", "strings_eval", "strings_ood", "strings_long")]
    strings.append({r["prompt"] for r in old_pre})
    assert sum(map(len, strings)) == len(set().union(*strings))

    def held_out(r):
        op, word = r["prompt"][:-1].split(":")
        return word[0] in gen.HELD_OUT_FIRST[op]

    assert all(held_out(r) for r in splits["strings_ood"])
    for rows in (old_pre, splits["strings_train"], splits["strings_eval"], splits["strings_long"]):
        assert not any(held_out(r) for r in rows)
    # every held-out first letter is seen first in training, under the other operations
    firsts = {r["prompt"].split(":")[1][0] for r in old_pre}
    assert set("".join(gen.HELD_OUT_FIRST.values())) <= firsts
    assert all(3 <= len(r["response"]) <= 8 for r in splits["strings_ood"])
    assert all(9 <= len(r["response"]) <= 10 for r in splits["strings_long"])


def test_surface_forms_assets_have_the_designed_properties():
    from otr_megatron.data import synthetic as gen

    splits = gen.forms_splits()
    for name, rows in splits.items():
        assert _read(name) == rows, f"assets:ab_{name}.jsonl differs from otr_megatron.data.synthetic.forms_splits()"
    n = lambda r: int(r["prompt"][2:-1])  # noqa: E731
    fixed, many, ev = splits["forms_fixed"], splits["forms_many"], splits["forms_eval"]
    assert [r["prompt"] for r in fixed] == [r["prompt"] for r in many]  # paired conditions
    assert all(r["response"] == gen.number_forms(n(r))[0] for r in fixed + ev)
    assert all(len(set(gen.number_forms(n(r)))) == 8 for r in ev)
    # (b): uniform over the 8 forms, canonical share ~1/8 (binomial, 4000 draws)
    canon = np.mean([r["response"] == gen.number_forms(n(r))[0] for r in many])
    assert abs(canon - 1 / 8) < 4 * math.sqrt(1 / 8 * 7 / 8 / len(many))
    assert all(r["response"] in gen.number_forms(n(r)) for r in many)
    pre = splits["forms_pretrain"]
    prior = [r for r in pre if r["prompt"].startswith("N:")]
    canon = np.mean([r["response"] == gen.number_forms(n(r))[0] for r in prior])  # 0.5 + 0.5 / 8
    assert abs(canon - 0.5625) < 4 * math.sqrt(0.5625 * 0.4375 / len(prior))
    nums = [set(map(n, rows)) for rows in (prior, fixed, ev)]
    assert not (nums[0] & nums[1]) and not (nums[0] & nums[2]) and not (nums[1] & nums[2])
    # the rest of the warm start is the shipped study's, row for row
    assert sorted(map(json.dumps, (r for r in pre if not r["prompt"].startswith("N:")))) == sorted(
        map(json.dumps, gen.ab_splits()["pretrain"]))


def test_configs_compare_ab_yaml_equals_the_embedded_study():
    with open(os.path.join(ROOT, "configs", "compare_ab.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f) == compare_cli.AB_TRAIN
