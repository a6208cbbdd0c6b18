"""FLYT scoring: a DataLoader whose workers each read whole shards, apply the scoring base's validation
transform and tokenizer and send batches that never cross a shard boundary; the last batch of a shard is
flagged so its file is written as soon as it is complete."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path

from flyt.data.pool import Shard, first_copies
from flyt.data.webdataset import iter_tar
from flyt.data.score_files import Output, shard_stats, write_shard
from flyt.errors import FlytError
from flyt.runner.job import error_message


def _shard_batches_class():
    import torch

    class ShardBatches(torch.utils.data.IterableDataset):
        """Each worker reads whole shards (its share of the list) and yields batches within one shard.

        Items: {"shard", "image", "text", "uid", "key", "read", "last"[, "skipped"]} or, for a shard that
        cannot be read, {"shard", "error"} (its earlier batches are then to be discarded).
        """

        def __init__(self, shards: list[str], batch_size: int, preprocess, tokenizer):
            self.shards, self.batch_size, self.preprocess, self.tokenizer = shards, batch_size, preprocess, tokenizer

        def __iter__(self):
            from flyt.streams.workers import worker_share

            for index in worker_share(range(len(self.shards))):  # an idle worker (more workers than shards) yields nothing
                yield from self._shard(index)

        def _shard(self, index: int):
            from flyt.data.samples import decode_pair

            skipped, samples, read = Counter(), [], 0
            try:
                for raw in iter_tar(Path(self.shards[index])):
                    read += 1
                    sample = decode_pair(raw, skipped)
                    if sample is None:
                        continue
                    try:
                        sample["image"] = self.preprocess(sample["image"])
                    except Exception:
                        skipped["bad_image"] += 1
                        continue
                    if len(samples) == self.batch_size:  # a next sample exists: this batch is not the last
                        batch = self._batch(index, samples, read - 1, last=False)
                        samples, read = [], 1
                        yield batch
                    samples.append(sample)
            except Exception as exc:
                yield {"shard": index, "error": error_message(exc)}
                return
            batch = self._batch(index, samples, read, last=True)
            batch["skipped"] = dict(skipped)
            yield batch

        def _batch(self, index: int, samples: list[dict], read: int, last: bool) -> dict:
            has = bool(samples)
            return {"shard": index, "last": last, "read": read,
                    "image": torch.stack([s["image"] for s in samples]) if has else None,
                    "text": self.tokenizer([s["text"] for s in samples]) if has else None,
                    "uid": [s["uid"] for s in samples], "key": [s["key"] for s in samples]}

    return ShardBatches


def val_transforms(model, spec):
    """The scoring base's validation transform and tokenizer, as OpenCLIP builds them for its name."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from flyt.models.networks import register_model_configs

    register_model_configs()
    preprocess = image_transform_v2(PreprocessCfg(**model.clip_model.visual.preprocess_cfg), is_train=False)
    return preprocess, open_clip.get_tokenizer(spec.model)


def forward_scores(model, image, text, device, precision: str):
    """Scores of one batch under inference mode (and autocast for amp / amp_bf16), as float32 numpy."""
    import contextlib

    import torch

    autocast = contextlib.nullcontext()
    if precision in ("amp", "amp_bf16"):
        autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "amp" else torch.bfloat16)
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.inference_mode(), autocast:
        out = model({"image": image.to(device, dtype=dtype, non_blocking=True), "text": text.to(device, non_blocking=True)})
    return out.float().cpu().numpy()


def score_flyt(shards: list[tuple[Shard, object]], output: Output, model, spec, batch_size: int, workers: int,
               device, precision: str):
    """Score ``shards`` ((shard, uids an earlier shard scores) pairs) through one data loader; yields
    (index in ``shards``, statistics or the shard's error) as each shard's file is written."""
    import torch

    if not shards:
        return
    preprocess, tokenizer = val_transforms(model, spec)
    dataset = _shard_batches_class()([str(s.path) for s, _ in shards], batch_size, preprocess, tokenizer)
    workers = min(workers, len(shards))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers:  # the loader's processes need cores too: do not oversubscribe them
        torch.set_num_threads(max(1, min(threads, _cpu_count() - workers)))
    try:
        yield from _flyt_loop(loader, shards, output, model, device, precision)
    finally:
        torch.set_num_threads(threads)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _flyt_loop(loader, shards: list[tuple[Shard, object]], output: Output, model, device, precision: str):
    import numpy as np

    partial: dict[int, list] = defaultdict(list)
    timings: dict[int, Counter] = defaultdict(Counter)
    read: Counter = Counter()
    waited = time.perf_counter()
    for item in loader:
        index = item["shard"]
        shard, taken = shards[index]
        timings[index]["data_wait_s"] += time.perf_counter() - waited
        if "error" in item:
            partial.pop(index, None)
            timings.pop(index, None)
            yield index, FlytError(item["error"])
            waited = time.perf_counter()
            continue
        if item["image"] is not None:
            started = time.perf_counter()
            scores = forward_scores(model, item["image"], item["text"], device, precision)
            timings[index]["model_s"] += time.perf_counter() - started
            partial[index].append((item["uid"], item["key"], scores))
        read[index] += item["read"]
        if item["last"]:
            started = time.perf_counter()
            parts = partial.pop(index, [])
            uids = [u for p in parts for u in p[0]]
            keys = [k for p in parts for k in p[1]]
            scores = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
            skipped = Counter(item["skipped"])
            first = first_copies(uids, taken)
            skipped["repeated_uid"] += int((~first).sum())
            finite = np.isfinite(scores)
            skipped["nonfinite_score"] += int((first & ~finite).sum())
            keep = first & finite
            if not keep.all():
                uids = [u for u, f in zip(uids, keep) if f]
                keys = [k for k, f in zip(keys, keep) if f]
                scores = scores[keep]
            stats = shard_stats(shard, len(scores), +skipped)
            write_shard(output.part(shard), uids, keys, scores, stats)
            spent = timings.pop(index)
            spent["write_s"] += time.perf_counter() - started
            yield index, {**stats, "samples": read.pop(index), "timings": dict(spent)}
        waited = time.perf_counter()
