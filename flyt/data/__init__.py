"""The on-disk formats, torch-free: WebDataset shards and pools, samples, uids and subsets, per-shard score files, M-FLYT input scores, task folders."""
