"""How fast ``flyt score`` scores a pool, measured in one run.

    python benchmarks/scoring.py                                   # 10M M-FLYT rows, 4000 FLYT samples
    python benchmarks/scoring.py --rows 1000000 --images 1000      # quick

Prints:
  (1) M-FLYT scoring from parquet on a generated pool of ``--rows`` rows in ``--shards`` shards (random
      uids, img2dataset keys, ``--fields`` input scores; written with numpy + pyarrow, no images): rows/s of
      the whole run (one thread, and ``--mflyt_threads`` shards at a time) and of each phase in the one-thread
      run (read the metadata and score files, join, compute the mixer, write), once with score files in the
      metadata's row order and once with their rows shuffled (a real join); and its ratio to plain parquet
      I/O of the same files in one thread (read both inputs, write uid/key/score; no join, no mixer).
  (2) FLYT image scoring with ``--flyt_model`` (flyt-tiny) on a toydata pool of ``--images`` samples: samples/s for each
      ``--workers`` value, against the model's forward alone on the same batches decoded beforehand
      (same batch size, same intra-op threads), and their ratio (goal <= 1.3 with enough workers).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flyt.cli import main as flyt_main  # noqa: E402


def _fixed_strings(chars: np.ndarray) -> pa.Array:
    """An arrow string array from an (n, width) uint8 array of ASCII characters, without Python objects."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars).tobytes()))


def _keys(shard: int, n: int) -> pa.Array:
    """img2dataset keys: 8 digits of shard id, then the sample's index in 7 digits."""
    digits = np.empty((n, 15), np.uint8)
    digits[:, :8] = np.frombuffer(f"{shard:08d}".encode(), np.uint8)
    index = np.arange(n)
    for j in range(14, 7, -1):
        digits[:, j] = ord("0") + index % 10
        index //= 10
    return _fixed_strings(digits)


def _uids(rng: np.random.Generator, n: int) -> pa.Array:
    hexdigits = np.frombuffer(b"0123456789abcdef", np.uint8)
    return _fixed_strings(hexdigits[rng.integers(0, 16, (n, 32), dtype=np.uint8)])


def write_score_pool(root: Path, rows: int, shards: int, fields: list[str], seed: int = 0) -> None:
    """pool/NNNNNNNN.{tar,parquet} (empty tars: M-FLYT never opens them) and scores{,_shuffled}/NNNNNNNN_scores.parquet."""
    rng = np.random.default_rng(seed)
    for sub in ("pool", "scores", "scores_shuffled"):
        (root / sub).mkdir(parents=True)
    for shard, n in enumerate(np.diff(np.linspace(0, rows, shards + 1).astype(np.int64))):
        name = f"{shard:08d}"
        with tarfile.open(root / "pool" / f"{name}.tar", "w"):
            pass
        uids, keys = _uids(rng, int(n)), _keys(shard, int(n))
        pq.write_table(pa.table({"uid": uids, "key": keys}), root / "pool" / f"{name}.parquet")
        scores = pa.table({"key": keys, "uid": uids, **{f: rng.normal(size=int(n)) for f in fields}})
        pq.write_table(scores, root / "scores" / f"{name}_scores.parquet")
        pq.write_table(scores.take(pa.array(rng.permutation(int(n)))), root / "scores_shuffled" / f"{name}_scores.parquet")


def _run(argv: list[str]) -> dict:
    """One ``flyt score`` in this process (its output silenced); returns its summary."""
    out = Path(argv[argv.index("--output") + 1])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = flyt_main(["score", *argv])
    if code != 0:
        raise SystemExit(f"flyt score {' '.join(argv)} exited with {code}")
    return json.loads((out / "_summary.json").read_text())


def plain_io_seconds(root: Path, scores: str, fields: list[str]) -> float:
    """Seconds to read each shard's metadata and score file and write uid/key/score as ``flyt score`` writes
    them, with no join and no mixer: the floor the whole M-FLYT run is measured against."""
    from flyt.data.score_files import WRITE_OPTIONS

    out = root / "out_plain"
    out.mkdir()
    started = time.perf_counter()
    for meta in sorted((root / "pool").glob("*.parquet")):
        ids = pq.read_table(meta, columns=["uid", "key"])
        table = pq.read_table(root / scores / f"{meta.stem}_scores.parquet", columns=["key", *fields])
        score = table[fields[0]].cast(pa.float32())
        pq.write_table(pa.table({"uid": ids["uid"], "score": score, "key": ids["key"]}), out / meta.name, **WRITE_OPTIONS)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return seconds


def bench_mflyt(args, root: Path) -> None:
    import torch

    fields = [f"score_{i}" for i in range(args.fields)]
    started = time.perf_counter()
    write_score_pool(root, args.rows, args.shards, fields)
    print(f"(1) M-FLYT from parquet: {args.rows:,} rows in {args.shards} shards, {args.fields} input scores "
          f"(generated in {time.perf_counter() - started:.1f} s)")
    ckpt = root / "mixer.pt"  # the original's layout: a plain state_dict
    torch.save({"layers.0.weight": torch.randn(1, args.fields), "layers.0.bias": torch.randn(1)}, ckpt)
    for label, scores in (("same row order", "scores"), ("shuffled rows", "scores_shuffled")):
        line = f"  {label}:"
        plain = plain_io_seconds(root, scores, fields)
        for workers in (0, args.mflyt_threads):
            out = root / f"out_{scores}_{workers}"
            summary = _run(["--checkpoint", str(ckpt), "--upstream_data_dir", str(root / "pool"), "--parquet_dir",
                            str(root / scores), "--parquet_fields", *fields, "--output", str(out), "--workers", str(workers)])
            assert summary["samples_scored"] == args.rows, summary
            shutil.rmtree(out)
            line += (f"  whole run, {workers or 1} thread(s): {summary['samples_per_s'] / 1e6:4.1f}M rows/s "
                     f"({summary['scoring_seconds']:.2f} s);")
            if workers == 0:  # phases timed one after the other (with threads they overlap)
                line += (f" plain parquet I/O {plain:.2f} s, ratio {summary['scoring_seconds'] / plain:.2f} (goal <= 1.5);"
                         f" the command in all {summary['seconds']:.2f} s (the uid index and checks included),"
                         f" ratio {summary['seconds'] / plain:.2f};")
                t = summary["timings"]
                phases = "  ".join(f"{name} {args.rows / t[key] / 1e6:5.1f}M/s ({t[key]:.2f} s)"
                                   for name, key in (("read", "read_s"), ("join", "join_s"),
                                                     ("compute", "compute_s"), ("write", "write_s")))
        print(f"{line}\n    phases (1 thread): {phases}")
    print("  goal: >= 10M rows/s for the scoring itself (compute); read and write are parquet I/O")


def bench_flyt(args, root: Path) -> None:
    import torch

    from flyt.demo import toydata
    from flyt.models.checkpoint import load_scorer
    from flyt.data.samples import decode_pair
    from flyt.models.networks import ScorerSpec, build_scorer
    from flyt.jobs.score_flyt import _cpu_count, forward_scores, val_transforms
    from flyt.data.webdataset import iter_tar

    started = time.perf_counter()
    torch.manual_seed(0)
    scorer = build_scorer(ScorerSpec("flyt", args.flyt_model))
    size = scorer.clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    root.mkdir(parents=True)
    ckpt = root / "flyt.pt"
    torch.save({"state_dict": scorer.state_dict()}, ckpt)  # the original's layout: --model names the base
    toydata.write_pool(root / "images", args.images, n_shards=args.image_shards, seed=0, n_broken=args.images // 100,
                       image_size=size)
    print(f"(2) FLYT image scoring, {args.flyt_model} ({size}px), {args.images:,} samples in {args.image_shards} "
          f"shards, batch {args.batch_size}, CPU (generated in {time.perf_counter() - started:.1f} s)")
    model, spec = load_scorer(ckpt, model=args.flyt_model)
    preprocess, tokenizer = val_transforms(model, spec)
    batches = []  # decoded, transformed and tokenized beforehand, cut exactly as flyt score cuts them
    for shard in sorted((root / "images").glob("*.tar")):
        samples = [s for s in (decode_pair(raw, Counter()) for raw in iter_tar(shard)) if s]
        for i in range(0, len(samples), args.batch_size):
            chunk = samples[i:i + args.batch_size]
            batches.append((torch.stack([preprocess(s["image"]) for s in chunk]), tokenizer([s["text"] for s in chunk])))
    n = sum(len(b[0]) for b in batches)
    cpu = torch.device("cpu")
    default_threads = torch.get_num_threads()

    def forward_alone(threads: int) -> float:
        torch.set_num_threads(threads)
        try:
            forward_scores(model, *batches[0], cpu, "fp32")  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                for image, text in batches:
                    forward_scores(model, image, text, cpu, "fp32")
                best = min(best, time.perf_counter() - started)
            return n / best
        finally:
            torch.set_num_threads(default_threads)

    alone = {}
    for workers in args.workers:
        threads = max(1, min(default_threads, _cpu_count() - workers)) if workers else default_threads
        if threads not in alone:
            alone[threads] = forward_alone(threads)
        best = 0.0
        for _ in range(args.repeats):
            out = root / f"out_flyt_{workers}"
            summary = _run(["--checkpoint", str(ckpt), "--model", args.flyt_model, "--upstream_data_dir", str(root / "images"),
                            "--output", str(out), "--workers", str(workers), "--batch_size", str(args.batch_size),
                            "--device", "cpu"])
            assert summary["samples_scored"] == n, (summary["samples_scored"], n)
            best = max(best, summary["samples_per_s"])
            shutil.rmtree(out)
        print(f"  workers {workers}: {best:8.0f} samples/s | forward alone ({threads} thread(s)) {alone[threads]:8.0f} "
              f"samples/s | ratio {alone[threads] / best:5.2f} (goal <= 1.3)")
    print(f"  ({_cpu_count()} CPU(s) here; a ratio near 1 needs workers that decode as fast as the model scores)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="M-FLYT pool rows")
    parser.add_argument("--shards", type=int, default=10, help="M-FLYT pool shards")
    parser.add_argument("--fields", type=int, default=6, help="M-FLYT input scores per row")
    parser.add_argument("--mflyt_threads", type=int, default=4, help="M-FLYT: --workers of the threaded run")
    parser.add_argument("--flyt_model", default="flyt-tiny", help="FLYT: OpenCLIP name of the scoring base")
    parser.add_argument("--images", type=int, default=4000, help="FLYT pool samples")
    parser.add_argument("--image_shards", type=int, default=8, help="FLYT pool shards")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="FLYT data-loader workers to compare")
    parser.add_argument("--repeats", type=int, default=1, help="FLYT: best of this many runs")
    parser.add_argument("--skip_mflyt", action="store_true")
    parser.add_argument("--skip_flyt", action="store_true")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        if not args.skip_mflyt:
            bench_mflyt(args, root / "mflyt")
        if not args.skip_flyt:
            bench_flyt(args, root / "flyt")


if __name__ == "__main__":
    main()
