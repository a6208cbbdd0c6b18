"""``flyt train-clip``: train a CLIP on a (filtered) pool with OpenCLIP's loss and schedule.

This is the yardstick of a filter: the same small recipe trained on each candidate subset. OpenCLIP
provides the model, ``ClipLoss`` and the cosine schedule; this file only wires them to a subset stream
and writes an OpenCLIP-loadable ``DIR/NAME/checkpoints/epoch_latest.pt``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flyt.config import ClipTrainConfig, add_dataclass_arguments

    add_dataclass_arguments(parser, ClipTrainConfig)


def check_not_resharded_from(upstream_data_dir: str, subset: str) -> None:
    """Refuse ``--subset S`` on a folder resharded from S: its repeats are already written out, so each
    uid would be seen k*k times. Another subset on a resharded folder is allowed, with a warning."""
    import hashlib
    import sys
    from pathlib import Path

    import numpy as np

    from flyt.errors import FlytError
    from flyt.data.subset import load_subset

    digest = None
    for source in (Path(p) for p in upstream_data_dir.split("::") if p):
        try:
            meta = json.loads((source / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or not ("subset_sha256" in meta or "subset_file" in meta):
            continue
        if "subset_sha256" in meta:
            if digest is None:
                digest = hashlib.sha256(np.ascontiguousarray(load_subset(subset)).view(np.uint8)).hexdigest()
            same = meta["subset_sha256"] == digest
        else:  # a resharder that records only the file's path
            same = Path(str(meta["subset_file"])).resolve() == Path(subset).resolve()
        if same:
            raise FlytError(f"--subset {subset} is the subset {source} was resharded from (its meta.json): the folder "
                            "already holds each selected sample as often as the subset lists it; train on it "
                            "without --subset")
        print(f"flyt train-clip: warning: {source} is a reshard of another subset ({meta.get('subset_file', '?')}); "
              f"--subset {subset} selects from it, each repeat of the reshard counted again", file=sys.stderr)


def train_clip(cfg):
    """Train; returns a summary and how often each uid was seen (what the subset asked for), as sorted
    ``u8,u8`` uids and their counts."""
    import time
    from pathlib import Path

    import torch
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    from flyt import progress
    from flyt.atomic import append_whole, atomic_path
    from flyt.models import checkpoint
    from flyt.data.shards import parse_sources
    from flyt.data.webdataset import name_damaged
    from flyt.streams.subset import SeenUids, SubsetCounts, SubsetStream
    from flyt.errors import FlytError
    from flyt.models.networks import create_clip
    from flyt.method.optim import AdamWConfig, decays
    from flyt.precision import autocast, resolve_device, resolve_precision

    if cfg.subset:
        check_not_resharded_from(cfg.upstream_data_dir, cfg.subset)
    cfg.precision = resolve_precision(cfg.precision)
    device = resolve_device(cfg.device, cfg.precision)
    adamw = AdamWConfig.for_model(cfg.model, cfg.beta1, cfg.beta2, cfg.eps)
    torch.manual_seed(cfg.seed)
    model, preprocess_train, _, tokenizer = create_clip(cfg.model, cfg.pretrained, device, cfg.precision)
    shards = [s for src in parse_sources(cfg.upstream_data_dir) for s in src.shards]
    counts = SubsetCounts(cfg.subset) if cfg.subset else None
    stream = SubsetStream(shards, counts, cfg.batch_size, preprocess_train, tokenizer, cfg.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.wd},
         {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}],
        lr=cfg.lr, betas=adamw.betas, eps=adamw.eps)
    schedule = cosine_lr(optimizer, cfg.lr, cfg.warmup, cfg.steps)
    loss_fn = ClipLoss()
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" else None
    run_dir = Path(cfg.output_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "metrics.jsonl"
    with atomic_path(log) as tmp:  # a rerun starts the log afresh
        tmp.write_text("")
    start, skipped, seen = time.time(), {}, SeenUids()
    model.train()
    batches = iter(loader)
    with progress.bar(total=cfg.steps, desc="flyt train-clip", unit="step") as bar:
        for step in range(cfg.steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise FlytError(f"--subset {cfg.subset} selects no sample of {cfg.upstream_data_dir}") from None
            skipped[batch["worker"]] = batch["skipped"]
            name_damaged(batch["damaged"])  # the workers' damaged shards, named here once per run
            seen.add(batch["uid"])
            schedule(step)
            with autocast(cfg.precision, device):
                img, txt, scale = model(batch["image"].to(device), batch["text"].to(device))
                loss = loss_fn(img.float(), txt.float(), scale.float())
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # OpenCLIP's clamp to [0, ln 100]
            bar.update(1)
            if (step + 1) % cfg.log_every_n_steps == 0 or step + 1 == cfg.steps:  # always on the last step
                last = float(loss.detach())
                line = {"step": step + 1, "loss": last, "lr": optimizer.param_groups[0]["lr"],
                        "logit_scale": float(model.logit_scale.detach().exp())}
                append_whole(log, json.dumps(line) + "\n")  # whole lines only, a full disk named
                bar.set_postfix(loss=f"{last:.3f}")
    path = run_dir / "checkpoints" / "epoch_latest.pt"
    checkpoint.save_clip(path, model, optimizer, cfg.steps, cfg.run_name)
    uids, counts = seen.result()
    return {"checkpoint": str(path), "steps": cfg.steps, "seconds": round(time.time() - start, 1),
            "final_loss": last, "unique_samples_seen": len(uids),
            "skipped_samples": sum(sum(c.values()) for c in skipped.values()),
            "skipped": dict(sorted(sum(map(Counter, skipped.values()), Counter()).items()))}, (uids, counts)


def run(args: argparse.Namespace) -> int:
    from flyt.config import ClipTrainConfig, config_from_args

    summary, _ = train_clip(config_from_args(ClipTrainConfig, args))
    print("flyt train-clip: done " + json.dumps(summary))
    return 0
