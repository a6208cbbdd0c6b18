"""flyt: learned data filtering for CLIP pretraining (FLYT, M-FLYT, Soft/Hard Cap Sampling).

Importing the package is cheap: torch and open_clip load only inside the modules that need them.
"""

__version__ = "0.1.0"
