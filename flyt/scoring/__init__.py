"""The parts of ``flyt score``: the pool's shards and ids, the M-FLYT mixer, the FLYT image path, the output."""
