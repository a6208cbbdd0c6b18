"""The models of ``flyt features`` and the pass over a pool's images that feeds them.

``load_models`` builds a worker's state once: every teacher CLIP with its own validation transform and
tokenizer, the FLYT scorer, and the NormSim target embeddings (the target tasks' training images,
embedded by each teacher). ``pool_batches`` runs flyt score's data loader of whole-shard batches with
one decode per image and one transformed view per model, and embeds each batch with every model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from flyt.errors import FlytError
from flyt.jobs.score_flyt import _cpu_count, _shard_batches_class, forward_scores, val_transforms


def load_models(s, images: bool, targets: bool) -> dict:
    """A worker's models: teachers when images are read or NormSim needs target embeddings."""
    from flyt.data import embeddings as cache
    from flyt.precision import resolve_device

    device = resolve_device(s.device, s.precision)
    state = {"device": device, "teachers": {}, "logit_scale": {}, "targets": {}, "flyt": None}
    if not images:
        index = cache.read_index(s.from_embeddings)
        state["logit_scale"] = {t.label: float(index[s.cache_labels[t.label]]["logit_scale"]) for t in s.teachers}
    if images or targets:
        for teacher in s.teachers:
            model, preprocess, tokenizer = _teacher(teacher, device, s.precision)
            state["teachers"][teacher.label] = (model, preprocess, tokenizer)
            if images:
                state["logit_scale"][teacher.label] = float(model.logit_scale.detach().exp())
    if images and s.save_embeddings:
        cache.write_index(s.output / cache.FOLDER, {
            t.label: {**t.definition(), "dim": int(state["teachers"][t.label][0].visual.output_dim),
                      "logit_scale": state["logit_scale"][t.label]} for t in s.teachers})
    if images and any(c.score == "flyt" for c in s.columns):
        from flyt.models.checkpoint import load_scorer

        scorer, spec = load_scorer(s.flyt_checkpoint, s.flyt_model, device=device,
                                   precision="bf16" if s.precision == "bf16" else "fp32")
        if spec.mode != "flyt":
            raise FlytError(f"--flyt_checkpoint {s.flyt_checkpoint} is an M-FLYT mixer, not a FLYT scorer")
        state["flyt"] = (scorer, *val_transforms(scorer, spec))
    if targets:
        state["targets"] = _target_embeddings(s, state)
    return state


def _teacher(teacher, device, precision: str):
    from flyt.models.networks import create_clip

    try:
        model, _, preprocess, tokenizer = create_clip(teacher.model, teacher.pretrained, device, precision)
    except FlytError:
        raise
    except Exception as exc:  # a checkpoint that does not fit the architecture, a failed download
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FlytError(f"--teacher {teacher.model}:{teacher.pretrained}: cannot load it ({type(exc).__name__}: {line})") from None
    return model.eval(), preprocess, tokenizer


def embed(model, images, tokens, device, precision: str):
    """Normalised image (and text, when ``tokens`` is given) embeddings of one batch, rounded to float16."""
    import torch

    from flyt.precision import autocast

    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.inference_mode(), autocast(precision, device):
        image = model.encode_image(images.to(device, dtype=dtype, non_blocking=True), normalize=True)
        text = None if tokens is None else model.encode_text(tokens.to(device, non_blocking=True), normalize=True)
    return image.to(torch.float16).cpu(), None if text is None else text.to(torch.float16).cpu()


def _target_embeddings(s, state) -> dict:
    """Per teacher, the float16 image embeddings of every decodable training image of the target tasks."""
    import torch

    from flyt.data.webdataset import iter_tar
    from flyt.data.samples import decode_labelled

    teachers = state["teachers"]
    out = {label: [] for label in teachers}
    skipped = Counter()

    def flush(images):
        for label, (model, preprocess, _) in teachers.items():
            batch = torch.stack([preprocess(img) for img in images])
            out[label].append(embed(model, batch, None, state["device"], s.precision)[0])

    pending = []
    for path in s.targets:
        for raw in iter_tar(Path(path)):
            sample = decode_labelled(raw, skipped)
            if sample is not None:
                pending.append(sample["image"])
            if len(pending) == s.batch_size:
                flush(pending)
                pending = []
    if pending:
        flush(pending)
    if not any(out.values()):
        raise FlytError(f"--target_tasks: no decodable training images in {', '.join(map(str, s.targets))}")
    return {label: torch.cat(parts) for label, parts in out.items()}


class Views:
    """One decoded image -> its size and one tensor per distinct transform (models whose transforms are
    the same, as OpenAI's ViT-B/32 and ViT-L/14 are, share one); ``of[j]`` is model j's view."""

    def __init__(self, transforms):
        names = [repr(t) for t in transforms]  # torchvision's repr lists every step and its settings
        unique = list(dict.fromkeys(names))
        self.transforms = [transforms[names.index(u)] for u in unique]
        self.of = [unique.index(n) for n in names]

    def __call__(self, image):
        return {"size": image.size, "views": [t(image) for t in self.transforms]}


def _feature_batches_class():
    import torch

    class FeatureBatches(_shard_batches_class()):
        """flyt score's whole-shard batches, carrying the captions, sizes and one image tensor per model."""

        def _batch(self, index: int, samples: list[dict], read: int, last: bool) -> dict:
            views = list(zip(*[s["image"]["views"] for s in samples]))
            texts = [s["text"] for s in samples]
            return {"shard": index, "last": last, "read": read, "uid": [s["uid"] for s in samples],
                    "key": [s["key"] for s in samples], "text": texts,
                    "size": [s["image"]["size"] for s in samples],
                    "images": [torch.stack(v) for v in views],
                    "tokens": [tok(texts) for tok in self.tokenizer] if samples else []}

    return FeatureBatches


def pool_batches(shards, s, state):
    """The shards' batches, each with every teacher's embeddings and the FLYT scores; ``error`` items as
    flyt score's loader sends them."""
    import torch

    models = [(label, model) for label, (model, _, _) in state["teachers"].items()]
    transforms = [p for _, p, _ in state["teachers"].values()]
    tokenizers = [t for _, _, t in state["teachers"].values()]
    if state["flyt"] is not None:
        transforms.append(state["flyt"][1])
        tokenizers.append(state["flyt"][2])
    views = Views(transforms)
    dataset = _feature_batches_class()([str(x.path) for x in shards], s.batch_size, views, tokenizers)
    workers = min(s.workers, len(shards))
    device = state["device"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers:  # the loader's processes need cores too
        torch.set_num_threads(max(1, min(threads, _cpu_count() - workers)))
    try:
        for item in loader:
            if "error" in item:
                yield item
                continue
            item["embeddings"] = {}
            if item["uid"]:
                for j, (label, model) in enumerate(models):
                    item["embeddings"][label] = embed(model, item["images"][views.of[j]], item["tokens"][j], device,
                                                      s.precision)
                if state["flyt"] is not None:
                    item["flyt"] = forward_scores(state["flyt"][0], item["images"][views.of[-1]], item["tokens"][-1],
                                                  device, s.precision)
            del item["images"], item["tokens"]
            yield item
    finally:
        torch.set_num_threads(threads)
