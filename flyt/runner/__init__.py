"""Restartable per-shard jobs and the executors that run them (this process, threads, processes, Ray)."""
