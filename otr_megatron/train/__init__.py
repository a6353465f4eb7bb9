"""The `otr-megatron train` job: config, launcher, Megatron training loop, checkpoints, metrics."""
