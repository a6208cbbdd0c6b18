"""From scores to a training set: samplers and their sharpness, numpy only."""
