"""Data at the edges: upstream pools, downstream tasks, M-FLYT input scores, the training stream."""
