"""The OTR reports: one table of what the loss logs, where each number comes from, how it reduces.

Every report is a `[sum, count]` pair per micro-batch (Megatron's contract): the training loops sum
the pairs over micro-batches and DP x CP ranks, then divide, so the logged value is an exact mean
in any layout. `otr_report` builds them (used by `training.loss_func`, the Bridge step and the
NeMo step) and `reduce_reports` sums them (the train job, the NeMo loss reduction, the tests).

"lm loss" keeps Megatron's meaning, the label cross entropy, so SFT and OTR runs read alike; what
OTR backpropagates is "otr loss". `can_be_negative` marks the reports a console must not drop for
being negative (Megatron-Bridge's `training_log` prints an average only `if avg >= 0.0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch


@dataclass(frozen=True)
class Report:
    name: str  # key in the report dict and in the logs
    stat: Optional[str]  # the core loss's per-token stat it averages; None: the loss that is backpropagated
    sign: float = 1.0  # applied to the stat
    per_sample: bool = False  # the stat counts over the K samples: divided by K
    can_be_negative: bool = False
    meaning: str = ""


OTR_REPORTS: tuple[Report, ...] = (
    Report("lm loss", "label_logprob", sign=-1.0,
           meaning="label cross entropy -log p(label), mean over supervised tokens (as in SFT)"),
    Report("otr loss", None, can_be_negative=True,
           meaning="the loss that is backpropagated (the OTR surrogate; per sequence under "
                   "normalization='sequence'); not a log-likelihood, slightly negative with beta < 0"),
    Report("otr hit rate", "hits", per_sample=True,
           meaning="share of the K samples equal to the label (sample estimator)"),
    Report("otr mean reward", "reward_mean", can_be_negative=True,
           meaning="mean reward sum_j R_j / K (sample estimator); negative while hits are rarer than -beta/(1-beta)"),
)
REPORT_NAMES: tuple[str, ...] = tuple(r.name for r in OTR_REPORTS)
NEGATIVE_REPORTS: frozenset[str] = frozenset(r.name for r in OTR_REPORTS if r.can_be_negative)


def otr_report(loss_mask: torch.Tensor, loss_sum: torch.Tensor, num_tokens, stats: Optional[dict],
               num_samples: Optional[int]) -> dict:
    """`{name: [sum, count]}` (detached) of one micro-batch, for every report its stats allow.

    loss_sum / num_tokens: the backpropagated loss's sum and count. stats: the hook's per-token
    stats [b, s] (`pop_otr_stats`); None when OTR is off, then the loss is cross entropy and is
    reported as "lm loss" only, exactly as Megatron does. num_samples: K (for the hit rate).
    """
    count = torch.as_tensor(num_tokens, device=loss_sum.device).detach().float().reshape(())
    loss_pair = torch.stack([loss_sum.detach().float().reshape(()), count])
    if stats is None:
        return {"lm loss": loss_pair}
    mask = loss_mask.reshape(-1).float()
    keep = mask != 0
    n_tok = mask.sum().detach()
    report = {}
    for r in OTR_REPORTS:
        if r.stat is None:
            report[r.name] = loss_pair.clone()
            continue
        if r.stat not in stats or (r.per_sample and not num_samples):
            continue
        v = stats[r.stat].reshape(-1).float() * r.sign
        if r.per_sample:
            v = v / float(num_samples)
        s = torch.sum(torch.where(keep, v * mask, torch.zeros_like(v)))
        report[r.name] = torch.stack([s.detach(), n_tok])
    return report


def reduce_reports(reports: Iterable[dict], names: Sequence[str] = REPORT_NAMES, group=None,
                   contribute: bool = True) -> dict[str, tuple[float, float]]:
    """`{name: (sum, count)}`: the `[sum, count]` pairs summed over micro-batches, then all-reduced
    over `group` (None: this process only). Every rank of `group` must call it with the same
    `names`; a rank with `contribute=False` adds zeros (e.g. a pipeline stage without the loss)."""
    names = list(names)
    acc = None  # summed where the reports live; one copy to the host at the end (no sync per report)
    if contribute:
        for rep in reports or []:
            for i, name in enumerate(names):
                if name in rep:
                    pair = torch.as_tensor(rep[name]).detach().reshape(-1)[:2].double()
                    if acc is None:
                        acc = torch.zeros(len(names), 2, dtype=torch.float64, device=pair.device)
                    acc[i] += pair.to(acc.device)
    if acc is None:
        acc = torch.zeros(len(names), 2, dtype=torch.float64)
    if group is not None and torch.distributed.is_initialized():
        dev = torch.device("cpu")
        if torch.distributed.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        acc = acc.to(dev)
        torch.distributed.all_reduce(acc, group=group)
    acc = acc.cpu()
    return {name: (float(acc[i, 0]), float(acc[i, 1])) for i, name in enumerate(names)}


def report_means(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """`sum / count` of each reduced report that counted anything."""
    return {name: s / c for name, (s, c) in totals.items() if c > 0}
