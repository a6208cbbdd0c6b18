"""The embedding cache of ``flyt features --save_embeddings`` (docs/formats.md, "Embedding cache").

Per pool shard: ``<shard>.parquet`` (uid, key, text, image_width, image_height; the shard's statistics
in its metadata) and, row-aligned with it, ``<shard>.<teacher>.image.npy`` / ``.text.npy`` (float16,
one row per sample), as clip-retrieval and DataComp store theirs; ``_embeddings.json`` says which model
each teacher label is. Scores that need only embeddings and captions are computed from it without
opening an image. Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flyt.atomic import atomic_file, atomic_path
from flyt.errors import FlytError

INDEX = "_embeddings.json"
FOLDER = "embeddings"  # inside the features folder of --save_embeddings
META_KEY = b"flyt_features"
COLUMNS = ("uid", "key", "text", "image_width", "image_height")


def shard_files(root: Path, shard: str, labels: list[str]) -> list[Path]:
    """The files of one shard in the cache: its parquet and two arrays per teacher."""
    return [root / f"{shard}.parquet"] + [root / f"{shard}.{label}.{kind}.npy" for label in labels
                                          for kind in ("image", "text")]


def write_index(root: Path, teachers: dict[str, dict]) -> None:
    """``_embeddings.json``: teacher label -> {model, pretrained, dim, logit_scale}; refuses another one."""
    path = root / INDEX
    if path.exists() and read_index(root) != teachers:
        raise FlytError(f"{path} describes other teachers than this run's: save the embeddings to another --output")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"teachers": teachers}, indent=1) + "\n")


def find_root(path: str | Path) -> Path:
    """The cache folder given to ``--from_embeddings``: it, or the ``embeddings/`` inside a features folder."""
    path = Path(path)
    for root in (path, path / FOLDER):
        if (root / INDEX).is_file():
            return root
    raise FlytError(f"--from_embeddings {path}: no {INDEX} there (expected a folder written by --save_embeddings)")


def read_index(root: Path) -> dict[str, dict]:
    try:
        return json.loads((root / INDEX).read_text())["teachers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlytError(f"{root / INDEX} is not a readable embedding index ({type(exc).__name__}: {exc})") from None


def write_shard(root: Path, shard: str, rows: dict, embeddings: dict[str, tuple], stats: dict) -> None:
    """One shard's rows (the ``COLUMNS``) and each teacher's (image, text) embeddings, as float16."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(rows["uid"])
    table = pa.table({"uid": pa.array(rows["uid"], pa.string()), "key": pa.array(rows["key"], pa.string()),
                      "text": pa.array(rows["text"], pa.string()),
                      "image_width": pa.array(rows["image_width"], pa.int32()),
                      "image_height": pa.array(rows["image_height"], pa.int32())})
    paths = shard_files(root, shard, list(embeddings))
    for path, array in zip(paths[1:], (a for pair in embeddings.values() for a in pair)):
        array = np.asarray(array, np.float16)
        if len(array) != n:
            raise ValueError(f"{path.name}: {len(array)} embeddings for {n} rows")
        with atomic_file(path) as f:
            np.save(f, array)
    with atomic_file(paths[0]) as f:
        pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(stats).encode()}), f)


def read_shard(root: Path, shard: str, labels: list[str]) -> tuple[dict, dict[str, tuple], dict]:
    """(rows as column -> list, label -> (image, text) float16 arrays, the shard's recorded statistics)."""
    import pyarrow.parquet as pq

    paths = shard_files(root, shard, labels)
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FlytError(f"the embedding cache has no {missing[0].name} in {root} (was shard {shard} cached?)")
    table = pq.read_table(paths[0], columns=list(COLUMNS))
    rows = {name: table[name].to_pylist() for name in COLUMNS}
    stats = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    arrays = [np.load(p, allow_pickle=False) for p in paths[1:]]
    for path, array in zip(paths[1:], arrays):
        if array.ndim != 2 or len(array) != table.num_rows:
            raise FlytError(f"{path} holds {array.shape} embeddings for the {table.num_rows} rows of {paths[0].name}")
    return rows, {label: (arrays[2 * j], arrays[2 * j + 1]) for j, label in enumerate(labels)}, stats
