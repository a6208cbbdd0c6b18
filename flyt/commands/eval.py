"""``flyt eval``: zero-shot classification of a CLIP on DataComp-format eval folders (see docs/formats.md).

A task is an original name (``mnist``, ``imagenet``, ...: the folder ``ROOT/wds_<...>_test/`` of
``--datacomp_eval_dir ROOT``, as in the task table) or the path of a self-describing folder. Either way the folder
holds ``classnames.txt``, ``zeroshot_classification_templates.txt`` (each template with ``{c}``) and
``test/*.tar`` (samples ``KEY.webp|png|jpg`` + ``KEY.cls``).

The classifier is OpenCLIP's zero-shot one: per class the mean of the L2-normalised embeddings of its
prompts, renormalised; a test image's logits are its normalised embedding times that matrix. Metrics as
in DataComp's ``eval_results.jsonl``: top-1 ``acc1``, ``acc5`` (at least 5 classes) and
``mean_per_class_recall`` (the mean over the classes present in the test set). Undecodable test samples
are skipped and counted by cause in the task's line (its metrics are over ``num_samples``). A task with
a damaged test shard gets no metrics at all, since they would be over an unknown part of its test set:
it is reported as failed, naming the shard, the other tasks are still evaluated, and the command exits
1; a test folder holding fewer shards than its ``nshards.txt`` says stops the command before the model
loads. The output has one JSON line per evaluated task, rewritten atomically after each task.

From Python (e.g. with a model already in memory)::

    from flyt.commands.eval import evaluate
    result = evaluate(model, preprocess_val, tokenizer, "path/to/task", batch_size=256, device="cuda")
    result["metrics"]["acc1"]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from flyt.errors import FlytError
from flyt.precision import PRECISIONS as _MODES

PRECISIONS = tuple(m for m in _MODES if m != "bf16")  # autocast modes: the model loads in fp32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import JoinTokens

    parser.add_argument("--model", required=True, help="OpenCLIP architecture name (e.g. ViT-B-32, flyt-tiny)")
    parser.add_argument("--pretrained", "--checkpoint", dest="checkpoint", default=None, metavar="FILE_OR_TAG",
                        help="CLIP weights: a local file (e.g. DIR/NAME/checkpoints/epoch_latest.pt of flyt train-clip, "
                             "or the reference epoch_latest.pt of flyt train) or an OpenCLIP pretrained tag "
                             "(e.g. openai); omitted: random initialisation")
    parser.add_argument("--datacomp_eval_dir", "--eval_dir", dest="eval_dir", default=None, metavar="DIR",
                        help="DataComp eval root holding wds_<task>_test/ folders (needed for task names)")
    parser.add_argument("--downstream_task_names", "--tasks", dest="tasks", action=JoinTokens, required=True,
                        metavar="TASK", help="tasks, space-separated or joined by '::': names of the task table in "
                        "docs/formats.md (mnist, cifar10, imagenet, ...) and/or folders holding classnames.txt, "
                        "zeroshot_classification_templates.txt and test/*.tar")
    parser.add_argument("--output", required=True, help="results file: one JSON line per task")
    parser.add_argument("--batch_size", type=int, default=256, help="test images per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes decoding test images")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", default=None,
                        help="fp32; amp / amp_bf16 (= amp_bfloat16): autocast in fp16 (CUDA only) / bf16 "
                             "(default: amp on CUDA, else fp32)")


# ----------------------------------------------------------------------------------------------- tasks


def resolve_eval_task(token: str, eval_dir: str | Path | None = None):
    """The evaluation side of a task: class names, templates and ``test_dir`` (``train_dir`` stays None).

    Lookup order: an original name with ``eval_dir`` -> ``eval_dir/<its wds_..._test folder>``; a folder
    ``eval_dir/<token>`` (or ``eval_dir/wds_<token>_test``) holding the text files; ``token`` itself as a folder path. The task is named
    ``token`` as given (it is the ``dataset`` of the results file).
    """
    from flyt.data.tasks import CLASSNAMES, ORIGINAL_TASKS, TEMPLATES, Task, read_text_files, task_folder

    root = Path(eval_dir) if eval_dir else None
    if root is not None and not root.is_dir():
        raise FlytError(f"--datacomp_eval_dir {root} is not a folder")
    if token in ORIGINAL_TASKS and root is not None:
        folder = root / ORIGINAL_TASKS[token][1]
        if not folder.is_dir():
            raise FlytError(f"task {token!r}: no folder {folder} (the DataComp eval folder {ORIGINAL_TASKS[token][1]}/ "
                            f"under --datacomp_eval_dir)")
    elif root is not None and task_folder(root, token) is not None:
        folder = task_folder(root, token)
    elif Path(token).is_dir():
        folder = Path(token)
    elif token in ORIGINAL_TASKS:
        raise FlytError(f"task {token!r} needs --datacomp_eval_dir, the folder holding {ORIGINAL_TASKS[token][1]}/")
    else:
        known = ", ".join(sorted(ORIGINAL_TASKS))
        raise FlytError(f"unknown task {token!r}: expected one of {known} (with --datacomp_eval_dir), or a folder "
                        f"holding {CLASSNAMES}, {TEMPLATES} and test/*.tar")
    classnames, templates = read_text_files(folder)
    return Task(token, classnames, templates, None, folder / "test")


# -------------------------------------------------------------------------------------------- classifier


def _template_fn(template) -> Callable[[str], str]:
    if callable(template):
        return template
    if "{c}" not in template:
        raise FlytError(f"zero-shot template {template!r} has no {{c}} placeholder for the class name")
    return lambda c, t=template: t.replace("{c}", c)


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence, device="cpu"):
    """(embed_dim, num_classes) float32: per class the mean of its normalised prompt embeddings, renormalised.

    ``templates`` are strings with ``{c}`` (the DataComp files' format) or callables ``classname -> prompt``.
    The model needs OpenCLIP's ``encode_text(tokens, normalize=True)``; call under autocast for amp.
    """
    import open_clip

    fns = [_template_fn(t) for t in templates]
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, list(classnames), fns,
                                                   num_classes_per_batch=10, device=device, use_tqdm=False)
    return weights.float()


# ----------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Running top-1 / top-5 / per-class counts over batches of (logits, labels)."""

    def __init__(self, num_classes: int):
        import torch

        self.num_classes = num_classes
        self.count = torch.zeros(num_classes, dtype=torch.long)
        self.correct1 = torch.zeros(num_classes, dtype=torch.long)
        self.correct5 = 0

    def update(self, logits, labels) -> None:
        import torch

        logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
        top = logits.topk(min(5, self.num_classes), dim=1).indices
        hit1 = top[:, 0] == labels
        self.count += torch.bincount(labels, minlength=self.num_classes)
        self.correct1 += torch.bincount(labels[hit1], minlength=self.num_classes)
        self.correct5 += int((top == labels[:, None]).any(dim=1).sum())

    @property
    def num_samples(self) -> int:
        return int(self.count.sum())

    def result(self) -> dict:
        n = self.num_samples
        if n == 0:
            raise ValueError("no samples")
        present = self.count > 0
        out = {"acc1": float(self.correct1.sum()) / n}
        if self.num_classes >= 5:
            out["acc5"] = self.correct5 / n
        out["mean_per_class_recall"] = float((self.correct1[present].double() / self.count[present]).mean())
        return out

    def per_class_recall(self) -> list[float | None]:
        """Top-1 recall of each class, None for a class with no test sample."""
        return [float(c) / int(n) if n else None for c, n in zip(self.correct1, self.count)]


def classification_metrics(logits, labels, num_classes: int | None = None) -> dict:
    """acc1, acc5 (when there are >= 5 classes) and mean per-class recall of one (N, C) logits matrix."""
    metrics = Metrics(num_classes or logits.shape[1])
    metrics.update(logits, labels)
    return metrics.result()


# ------------------------------------------------------------------------------------------------- data


def _test_stream(shards: list[str], preprocess: Callable, batch_size: int, task):
    import torch

    from flyt.data.samples import decode_labelled
    from flyt.data.webdataset import tar_samples
    from flyt.streams.workers import current_worker, worker_share

    num_classes = len(task.classnames)

    class TestStream(torch.utils.data.IterableDataset):
        """Batches of {image, label}; each worker takes whole shards, or every n-th sample if shards are few.

        Every worker ends with an item ``{"done": True}`` carrying its final skip counts and its ``error``
        (a damaged shard, a bad label: None if none), which the main process raises.
        """

        def __iter__(self):
            skipped, error = Counter(), None
            try:
                yield from self._batches(skipped)
            except FlytError as exc:  # raised in a worker, it would reach the user inside the worker's traceback
                error = str(exc)
            yield {"done": True, "worker": current_worker()[0], "skipped": dict(skipped), "error": error}

        def _batches(self, skipped: Counter):
            worker, workers = current_worker()
            by_shard = len(shards) >= workers
            images, labels = [], []
            for i, raw in enumerate(tar_samples(worker_share(shards) if by_shard else shards)):
                if not by_shard and i % workers != worker:
                    continue
                sample = decode_labelled(raw, skipped)
                if sample is None:
                    continue
                if not 0 <= sample["label"] < num_classes:
                    raise FlytError(f"sample {raw.get('__key__')} of {raw.get('__url__')} has label {sample['label']}, "
                                    f"but the task has {num_classes} class names")
                images.append(preprocess(sample["image"]))
                labels.append(sample["label"])
                if len(images) == batch_size:
                    yield {"image": torch.stack(images), "label": torch.tensor(labels), "done": False}
                    images, labels = [], []
            if images:
                yield {"image": torch.stack(images), "label": torch.tensor(labels), "done": False}

    return TestStream()


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(model, preprocess: Callable, tokenizer: Callable, task, batch_size: int = 256, device="cpu",
             workers: int = 0, precision: str = "fp32", eval_dir: str | Path | None = None, classifier=None,
             progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` (already built and placed on ``device``) on one task.

    ``task``: a :class:`flyt.data.tasks.Task` with ``test_dir`` (e.g. from :func:`resolve_eval_task`), or a
    task name / folder string resolved with ``eval_dir``. ``preprocess`` is the model's validation
    transform (PIL image -> tensor), ``tokenizer`` OpenCLIP's (list of str -> tokens). ``classifier`` may
    be given precomputed (see :func:`zero_shot_classifier`). The model is put in eval mode for the call
    and restored afterwards.

    Returns ``{"dataset", "metrics": {"acc1", ["acc5",] "mean_per_class_recall"}, "per_class_recall",
    "num_samples", "skipped": {cause: n}}``; ``per_class_recall`` follows ``task.classnames`` (None: no
    test sample). Test data that cannot all be read (a damaged shard, a missing one) is a
    :class:`FlytError` naming the file: metrics over part of a test set are not the benchmark's.
    """
    import torch

    from flyt import progress as meter
    from flyt.data.tasks import test_shards

    if isinstance(task, (str, Path)):
        task = resolve_eval_task(str(task), eval_dir)
    if task.test_dir is None:
        raise FlytError(f"task {task.name!r} has no test shards (test_dir is None)")
    if batch_size < 1 or workers < 0:
        raise FlytError(f"--batch_size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    from flyt.precision import autocast as autocast_of, resolve_device

    device = resolve_device(str(device), precision)
    shards = test_shards(task)
    autocast = autocast_of(precision, device)
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    image_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode(), autocast:
            if classifier is None:
                classifier = zero_shot_classifier(model, tokenizer, task.classnames, task.templates, device)
            classifier = classifier.to(device, torch.float32)
            metrics = Metrics(len(task.classnames))
            skipped: dict[int, dict] = {}
            loader = torch.utils.data.DataLoader(_test_stream(shards, preprocess, batch_size, task),
                                                 batch_size=None, num_workers=workers,
                                                 persistent_workers=False)
            with meter.bar(desc=f"flyt eval {task.name}", unit="img", disable=not progress, file=sys.stderr) as bar:
                for batch in loader:
                    if batch["done"]:
                        if batch["error"]:
                            raise FlytError(f"task {task.name!r}: {batch['error']}")
                        skipped[batch["worker"]] = batch["skipped"]
                        continue
                    images = batch["image"].to(device, image_dtype, non_blocking=True)
                    features = model.encode_image(images, normalize=True).float()
                    metrics.update(features @ classifier, batch["label"])
                    bar.update(len(batch["label"]))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    causes = dict(sorted(sum(map(Counter, skipped.values()), Counter()).items()))
    if metrics.num_samples == 0:
        raise FlytError(f"task {task.name!r}: no usable test sample in {task.test_dir} (skipped: {_causes(causes)})")
    return {"dataset": task.name, "metrics": metrics.result(), "per_class_recall": metrics.per_class_recall(),
            "num_samples": metrics.num_samples, "skipped": causes}


def _causes(skipped: dict) -> str:
    """``cause n, ...`` as the summary lines of flyt's commands print skipped counts."""
    return ", ".join(f"{cause} {n}" for cause, n in skipped.items()) or "none"


# ------------------------------------------------------------------------------------------------- CLI


def resolve_pretrained(model: str, checkpoint: str | None) -> str | None:
    """``--pretrained`` as ``create_clip``'s ``pretrained``: None, an existing file, or a known OpenCLIP tag."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    if path.is_file():
        return str(path)
    if path.exists():
        raise FlytError(f"--pretrained {checkpoint} is not a file")
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if checkpoint in tags:
        return checkpoint
    known = f" (OpenCLIP's tags for {model}: {', '.join(tags)})" if tags else ""
    raise FlytError(f"--pretrained {checkpoint}: no such file, and not an OpenCLIP pretrained tag of {model}{known}")


def load_model(model: str, checkpoint: str | None, device="cpu"):
    """(model, preprocess_val, tokenizer) from ``--model`` and ``--pretrained``; loading failures are one line."""
    from flyt.models.networks import create_clip

    pretrained = resolve_pretrained(model, checkpoint)
    try:
        clip, _, preprocess_val, tokenizer = create_clip(model, pretrained, device, "fp32")
    except FlytError:
        raise
    except Exception as exc:  # torch.load / load_state_dict / OpenCLIP's asserts: all mean "this file does not fit"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = type(exc).__name__ + (": " + " ".join(lines[:2])[:300] if lines else "")
        raise FlytError(f"cannot load --pretrained {checkpoint} into {model} ({detail})") from None
    return clip, preprocess_val, tokenizer


def format_table(results: list[dict]) -> str:
    width = max([len("task")] + [len(r["dataset"]) for r in results])
    lines = [f"{'task':<{width}}  {'acc1':>7}  {'acc5':>7}  {'mpcr':>7}  {'samples':>8}  {'skipped':>7}"]
    for r in results:
        m = r["metrics"]
        acc5 = f"{m['acc5']:7.4f}" if "acc5" in m else f"{'-':>7}"
        lines.append(f"{r['dataset']:<{width}}  {m['acc1']:7.4f}  {acc5}  {m['mean_per_class_recall']:7.4f}  "
                     f"{r['num_samples']:8d}  {sum(r['skipped'].values()):7d}")
    if len(results) > 1:
        mean = sum(r["metrics"]["acc1"] for r in results) / len(results)
        lines.append(f"{'average':<{width}}  {mean:7.4f}")
    return "\n".join(lines)


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    from flyt.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    from flyt.data.tasks import test_shards
    from flyt.precision import resolve_device, resolve_precision

    args.precision = resolve_precision(args.precision, PRECISIONS)
    device = resolve_device(args.device, args.precision)  # fail before any loading
    if args.batch_size < 1 or args.workers < 0:
        raise FlytError(f"--batch_size must be >= 1 and --workers >= 0 (got {args.batch_size}, {args.workers})")
    tasks = [resolve_eval_task(token, args.eval_dir) for token in args.tasks.split("::") if token]
    from flyt.atomic import check_writable

    for task in tasks:  # every task's shards exist before the model loads
        test_shards(task)
    check_writable(args.output)  # a read-only --output folder fails now, not after the evaluation
    model, preprocess, tokenizer = load_model(args.model, args.checkpoint, device)
    results, lines, failed = [], [], []
    for task in tasks:
        try:
            result = evaluate(model, preprocess, tokenizer, task, args.batch_size, device, args.workers,
                              args.precision)
        except FlytError as exc:  # this task's test data: the other tasks are still evaluated
            failed.append(f"flyt eval: FAILED {exc}")
            print(f"\n{failed[-1]}", file=sys.stderr, flush=True)
        else:
            results.append(result)
            lines.append({"dataset": result["dataset"], "model": args.model, "checkpoint": args.checkpoint,
                          "metrics": result["metrics"], "num_samples": result["num_samples"],
                          "skipped": result["skipped"]})
        _write_jsonl(Path(args.output), lines)  # atomically, after each task: finished tasks survive a crash
    if results:
        print(format_table(results))
    print("\n".join(failed + [f"flyt eval: wrote {len(lines)} result line(s) to {args.output}, {len(failed)} task(s) "
                               f"failed; skipped: {_causes(_sum_skipped(results))}"]))
    return 1 if failed else 0


def _sum_skipped(results: list[dict]) -> dict:
    return dict(sorted(sum((Counter(r["skipped"]) for r in results), Counter()).items()))
