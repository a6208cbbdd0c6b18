"""The models: reference CLIP, FLYT scoring model, M-FLYT mixer, and the one module that knows checkpoint files."""
