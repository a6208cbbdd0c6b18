"""Torch datasets over the formats of ``flyt.data``: the resampled training stream and subset passes."""
