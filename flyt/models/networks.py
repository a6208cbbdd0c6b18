"""The models of docs/algorithm.md: the reference CLIP, the FLYT scoring model (GLU head), the M-FLYT mixer.

State-dict keys match the original's released checkpoints: ``clip_model.<OpenCLIP keys>``,
``glu_model.layers.<i>.w1|w2|w3.weight|bias`` and ``layers.0.weight|bias``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import asdict, dataclass, field

import open_clip
import torch
from torch import nn

from flyt.errors import FlytError


def register_model_configs() -> None:
    """Make the package's tiny configs (flyt-tiny, flyt-small) known to OpenCLIP by name.

    ``import flyt`` already does this when open_clip is imported; kept for callers that use it.
    """
    import flyt

    flyt.register_model_configs(open_clip)


def image_dtype(model: nn.Module) -> torch.dtype:
    """The dtype images must have for ``model``: its image tower's weight matrices' (OpenCLIP's bf16 keeps
    norms and embeddings in float32, so the first parameter's dtype is not the one its convolution needs)."""
    weights = [p for name, p in model.named_parameters() if name.startswith("visual.") and p.ndim >= 2]
    if not weights:
        return next(model.parameters()).dtype
    dtypes = [p.dtype for p in weights]
    return max(set(dtypes), key=dtypes.count)


def create_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                precision: str = "fp32"):
    """An OpenCLIP model with its train/val transforms and tokenizer.

    ``pretrained`` is an OpenCLIP tag (e.g. ``openai``, downloaded on the user's machine) or a local file.
    """
    register_model_configs()
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise FlytError(f"--model {model!r} is not an OpenCLIP model name (see open_clip.list_models())")
    model_precision = "bf16" if precision == "bf16" else "fp32"
    said = _SayRandomInit(model)
    logging.getLogger().addFilter(said)
    try:
        clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device, precision=model_precision)
    except Exception as exc:
        from flyt.models.checkpoint import refusal

        raise refusal(pretrained, exc) or exc
    finally:
        logging.getLogger().removeFilter(said)
    _load_forward_ad_quietly()
    return clip, preprocess_train, preprocess_val, open_clip.get_tokenizer(model)


class _SayRandomInit(logging.Filter):
    """OpenCLIP's root-logger "Model initialized randomly" warning, said as flyt's own line instead.

    A filter added earlier (``checkpoint.load_scorer``, whose weights come next) drops the record first,
    and then nothing is said.
    """

    def __init__(self, model: str):
        super().__init__()
        self.model = model

    def filter(self, record: logging.LogRecord) -> bool:
        if "Model initialized randomly" not in record.getMessage():
            return True
        print(f"flyt: model {self.model}: random initialisation (no pretrained weights)", file=sys.stderr)
        return False


def _load_forward_ad_quietly() -> None:
    """Load torch's forward-mode AD support now, without its ``torch.jit.script`` FutureWarning.

    flyt differentiates CLIP models forward (``torch.func.jvp`` in training); on first use torch builds
    its jvp decompositions with ``torch.jit.script``, which warns about its own deprecation into every
    log. One tiny jvp here loads them, with exactly that warning ignored; later ones do not warn.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


class GLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x), with biases."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.w1 = nn.Linear(dim_in, hidden)
        self.w2 = nn.Linear(hidden, dim_out)
        self.w3 = nn.Linear(dim_in, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class GLUHead(nn.Module):
    """A stack of GLU layers: inner layers map 2D -> 2D, the last one 2D -> 1 (the score)."""

    def __init__(self, dim: int, n_layers: int, hidden_dim_mod: float):
        super().__init__()
        hidden = int(dim * hidden_dim_mod)
        if n_layers < 1 or hidden < 1:
            raise FlytError(f"--n_scoring_layers must be >= 1 and --hidden_dim_mod > 0 (got {n_layers}, {hidden_dim_mod})")
        self.layers = nn.ModuleList(GLU(dim, hidden, dim if i < n_layers - 1 else 1) for i in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)

    @torch.no_grad()
    def init_cosine_similarity(self, generator: torch.Generator | None = None, noise: float = 0.01) -> None:
        """Make a 1-layer head compute ~ img . txt on [img; txt] (``--cos_sim_init``, docs/algorithm.md "The models").

        W1 = diag(+1 on the image half, -1 on the text half), W3 maps [img; txt] to [txt; -img], W2 = ones:
        the output is sum SiLU(img) txt + SiLU(-txt)(-img), and SiLU(x) ~ x/2 near 0 makes it ~ img . txt.
        """
        layer = self.layers[0]
        dim = layer.w1.in_features
        if len(self.layers) != 1 or layer.w1.out_features != dim:
            raise FlytError("--cos_sim_init needs --n_scoring_layers 1 and --hidden_dim_mod 1")
        half = dim // 2
        eye = torch.eye(half)
        w1 = torch.zeros(dim, dim)
        w1[:half, :half], w1[half:, half:] = eye, -eye
        w3 = torch.zeros(dim, dim)
        w3[:half, half:], w3[half:, :half] = eye, -eye
        for lin, weight in ((layer.w1, w1), (layer.w3, w3), (layer.w2, torch.ones(1, dim))):
            lin.weight.copy_(weight + noise * torch.randn(weight.shape, generator=generator))
            lin.bias.copy_(noise * torch.randn(lin.bias.shape, generator=generator))


@dataclass
class ScorerSpec:
    """Everything needed to rebuild a scoring model from its checkpoint alone."""

    mode: str  # "flyt" (image-text GLU head) or "mflyt" (linear mixer over input scores)
    model: str | None = None  # OpenCLIP architecture of the FLYT base
    n_scoring_layers: int = 1
    hidden_dim_mod: float = 1.0
    parquet_fields: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScorerSpec":
        return cls(**d)


class ScoringModel(nn.Module):
    """FLYT's q_phi(image, text): a CLIP base, its normalised embeddings concatenated, a GLU head."""

    def __init__(self, clip_model: nn.Module, n_layers: int, hidden_dim_mod: float, train_base: bool = False):
        super().__init__()
        self.clip_model = clip_model
        self.glu_model = GLUHead(2 * clip_model.visual.output_dim, n_layers, hidden_dim_mod)
        self.train_base = train_base
        clip_model.requires_grad_(train_base)

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_base and torch.is_grad_enabled()):
            img = self.clip_model.encode_image(batch["image"].to(image_dtype(self.clip_model)), normalize=True)
            txt = self.clip_model.encode_text(batch["text"], normalize=True)
        head_dtype = self.glu_model.layers[0].w1.weight.dtype
        return self.glu_model(torch.cat([img, txt], dim=-1).to(head_dtype))


def restrict_trainable(scorer: "ScoringModel", which: str) -> None:
    """``output``: only the GLU head's W2 weights and all its biases train, W1/W3 weights stay frozen.

    The W1/W3 weights are most of the head (2 * (2D)^2 of them); moved by a small-batch signal at a
    large lr they scramble a good start, while W2 and the biases only reweight and shift it."""
    if which == "all":
        return
    if which != "output":
        raise FlytError(f"--scoring_trainable must be 'all' or 'output', got {which!r}")
    for layer in scorer.glu_model.layers:
        layer.w1.weight.requires_grad_(False)
        layer.w3.weight.requires_grad_(False)


class MixingModel(nn.Module):
    """M-FLYT's linear mixer over per-example input scores; its weights are the interpretable output."""

    def __init__(self, num_scores: int, init: str = "zeros"):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(num_scores, 1)])
        if init == "zeros":  # all examples start equal: no random preference to unlearn
            nn.init.zeros_(self.layers[0].weight)
            nn.init.zeros_(self.layers[0].bias)
        elif init != "random":
            raise FlytError(f"--mixer_init must be 'zeros' or 'random', got {init!r}")

    def forward(self, batch: dict) -> torch.Tensor:
        scores = batch["scores"].to(self.layers[0].weight.dtype)
        return self.layers[0](scores).squeeze(-1)


def build_scorer(spec: ScorerSpec, pretrained: str | None = None, device: str | torch.device = "cpu",
                 precision: str = "fp32", train_base: bool = False, mixer_init: str = "zeros") -> nn.Module:
    """Create the scoring model a spec describes (weights random or from ``pretrained`` for the base)."""
    if spec.mode == "mflyt":
        return MixingModel(len(spec.parquet_fields), mixer_init).to(device)
    if spec.mode != "flyt":
        raise FlytError(f"unknown scorer mode {spec.mode!r} (expected 'flyt' or 'mflyt')")
    clip_model = create_clip(spec.model, pretrained, device, precision)[0]
    return ScoringModel(clip_model, spec.n_scoring_layers, spec.hidden_dim_mod, train_base).to(device)
