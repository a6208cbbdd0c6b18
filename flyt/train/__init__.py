"""Training: the FLYT loop, its processes, held-out validation and diagnostics."""
