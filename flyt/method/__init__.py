"""The mathematics of FLYT (docs/algorithm.md): the bilevel step, losses, the differentiable optimiser, collectives. No files, no data."""
