"""`otr-megatron compare`: an A/B harness over fine-tuning losses, knobs and seeds.

Every arm of one seed starts from the same cross-entropy warm start (one checkpoint, copied), so
arms differ only in what the grid varies. Runs are `otr-megatron train` subprocesses; the harness
adds a probe (answer-position distributions of the warm start vs each tuned model, in one process)
and a report (mean +- std and n per metric per arm, paired differences, Markdown, JSON, plots).
"""
