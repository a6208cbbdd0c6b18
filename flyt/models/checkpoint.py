"""Checkpoint files: the one place that knows their layout.

``OUTPUT_DIR/EXP_NAME/checkpoints/`` holds ``scoring_epoch_<n>.pt`` / ``scoring_epoch_latest.pt`` (keys
``epoch``, ``name``, ``state_dict``, ``optimizer`` as in the original, plus ``flyt``: what rebuilding and
resuming need) and ``epoch_<n>.pt`` / ``epoch_latest.pt`` for the reference model (OpenCLIP's layout, so
``open_clip.create_model(name, pretrained=path)`` loads it). A run stopped by SIGTERM in mid-epoch leaves
``preempted.pt`` (``scoring`` and ``reference``: the two payloads of that step in one file) until the next
epoch's pair supersedes it. Files are written atomically and read with ``weights_only=True``: nothing in
them is code.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from flyt.atomic import atomic_file
from flyt.errors import FlytError, remote_hint
from flyt.models.networks import ScorerSpec, build_scorer

SCORING = "scoring_epoch_{}.pt"
REFERENCE = "epoch_{}.pt"
BEST = "scoring_best.pt"
PREEMPTED = "preempted.pt"


def save(ckpt_dir: Path, epoch: int, scoring: dict, reference: dict, numbered: bool) -> None:
    """Write the latest pair (and the numbered pair): every file in full first, then the renames back to
    back, scoring last, so a kill leaves at most a newer reference beside the older scoring file (which
    ``resume_point`` detects). The pair supersedes a pre-emption checkpoint, which goes."""
    names = ["latest"] + ([str(epoch)] if numbered else [])
    with contextlib.ExitStack() as renames:  # exits in reverse: the reference files are renamed first
        for pattern, payload in ((SCORING, scoring), (REFERENCE, reference)):
            for name in names:
                torch.save(payload, renames.enter_context(atomic_file(ckpt_dir / pattern.format(name))))
    (ckpt_dir / PREEMPTED).unlink(missing_ok=True)


def save_preempted(ckpt_dir: Path, scoring: dict, reference: dict) -> Path:
    """``preempted.pt``: both payloads of a step in mid-epoch, one atomic file."""
    with atomic_file(ckpt_dir / PREEMPTED) as f:
        torch.save({"scoring": scoring, "reference": reference}, f)
    return ckpt_dir / PREEMPTED


def save_best(ckpt_dir: Path, scoring: dict) -> Path:
    """``scoring_best.pt``: the scoring checkpoint of the best validation gain (``--keep_best``)."""
    with atomic_file(ckpt_dir / BEST) as f:
        torch.save(scoring, f)
    return ckpt_dir / BEST


def save_clip(path: Path, model, optimizer, step: int, name: str) -> None:
    """A plain CLIP checkpoint in OpenCLIP's layout (``state_dict`` key), loadable by ``create_model``."""
    with atomic_file(path) as f:
        torch.save({"epoch": step, "name": name, "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict()}, f)


def load(path: str | Path) -> dict:
    given, path = path, Path(path)
    if not path.is_file():
        raise FlytError(f"checkpoint {given} does not exist{remote_hint(given)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise refusal(path, exc) or FlytError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def refusal(path, exc: BaseException) -> FlytError | None:
    """The one-line refusal of a file that ``weights_only=True`` would not unpickle, else None.

    Such a file asks to build objects other than tensors and plain containers: unpickling it could run
    any code, so flyt never does (no ``weights_only=False`` fallback anywhere)."""
    import pickle
    import re

    if not isinstance(exc, pickle.UnpicklingError):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if not found:  # not a pickle asking for code (a damaged or foreign file): the caller's own message
        return None
    call = found.group(1)
    return FlytError(f"{path}: refused: unpickling it would call {call}, which could run any code; flyt loads "
                     "checkpoints with torch.load(weights_only=True) only")


def resume_point(ckpt_dir: Path, resume: str) -> tuple[Path, dict, dict] | None:
    """(file, scoring payload, reference payload) to resume from; None when ``latest`` finds nothing yet.
    ``latest`` takes the newer (by step) of the latest epoch pair and ``preempted.pt``."""
    if resume != "latest":
        return _point(Path(resume), reference_name=None)
    candidates = [_point(ckpt_dir / name, "latest") for name in (SCORING.format("latest"), PREEMPTED)
                  if (ckpt_dir / name).exists()]
    return max(candidates, key=lambda c: c[1]["flyt"]["step"], default=None)


def _point(path: Path, reference_name: str | None) -> tuple[Path, dict, dict]:
    ckpt = load(path)
    if "scoring" in ckpt and "reference" in ckpt:  # a pre-emption checkpoint
        return path, ckpt["scoring"], ckpt["reference"]
    if "flyt" not in ckpt:
        raise FlytError(f"--resume {path}: not a scoring checkpoint written by flyt train (no 'flyt' key)")
    epoch = ckpt["epoch"]
    for name in dict.fromkeys([reference_name or str(epoch), str(epoch)]):
        reference = path.parent / REFERENCE.format(name)
        if reference.exists() and (payload := load(reference))["epoch"] == epoch:
            return path, ckpt, payload  # a kill between the renames of save() leaves a newer epoch_latest.pt
    raise FlytError(f"{path} (epoch {epoch}) has no reference checkpoint of its epoch beside it "
                    f"({REFERENCE.format(reference_name or epoch)})")


def infer_spec(state_dict: dict, model: str | None, fields: list[str] | None) -> ScorerSpec:
    """The spec of a checkpoint without flyt metadata (the original's released files)."""
    if "layers.0.weight" in state_dict:
        n = state_dict["layers.0.weight"].shape[1]
        fields = list(fields or [])
        if len(fields) != n:
            raise FlytError(f"this M-FLYT checkpoint mixes {n} scores: name them with --parquet_fields (got {len(fields)})")
        return ScorerSpec("mflyt", parquet_fields=fields)
    layers = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("glu_model.layers.")})
    if not layers:
        raise FlytError("checkpoint holds neither an M-FLYT mixer (layers.0.*) nor a FLYT head (glu_model.*)")
    if not model:
        raise FlytError("this FLYT checkpoint does not name its CLIP architecture: pass --model")
    w1 = state_dict["glu_model.layers.0.w1.weight"]
    return ScorerSpec("flyt", model, len(layers), w1.shape[0] / w1.shape[1])


def load_scorer(path: str | Path, model: str | None = None, fields: list[str] | None = None,
                device: str | torch.device = "cpu", precision: str = "fp32"):
    """Rebuild a scoring model from its checkpoint alone (or, for original files, with model/fields)."""
    ckpt = load(path)
    state_dict = ckpt.get("state_dict", ckpt)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    meta = ckpt.get("flyt")
    spec = ScorerSpec.from_dict(meta["scorer"]) if meta else infer_spec(state_dict, model, fields)
    quiet = _NotRandomlyInitialised()  # OpenCLIP's warning would be wrong: the weights come next
    logging.getLogger().addFilter(quiet)
    try:
        scorer = build_scorer(spec, device=device, precision=precision)
    finally:
        logging.getLogger().removeFilter(quiet)
    try:
        scorer.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise FlytError(f"{path} does not fit a {spec.mode} scorer of model {spec.model}: {str(exc).splitlines()[0]}") from None
    return scorer.eval(), spec


class _NotRandomlyInitialised(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()
