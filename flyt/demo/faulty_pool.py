"""A fault-injection pool: one small DataComp-layout pool per fault that real pools carry, for the
reliability table (docs/reliability.md) and its test.

``python -m flyt.demo.faulty_pool OUT`` writes ``OUT/<case>/pool`` (2 shards of 8 clean samples, made by
:func:`flyt.demo.toydata.write_pool`, with the case's one fault injected) and, for the input-file cases,
``OUT/<case>/scores.parquet`` or ``OUT/<case>/subset.npy`` (a well-formed pool beside a bad input). The
``task_`` cases write ``OUT/<case>/task`` instead, an eval task folder (:func:`flyt.demo.toydata.write_task`:
``test/0.tar`` and ``test/1.tar`` of 4 samples each, ``test/nshards.txt``, the text files) whose test
data carries the fault.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from flyt.demo import toydata

SAMPLES, SHARDS = 16, 2
BOMB_SIDE = 10_000  # 10^8 pixels: past PIL's MAX_IMAGE_PIXELS (about 8.9e7), short of its hard 2x limit

CASES = {
    "truncated_tar": "shard 00000001.tar cut off in the middle of a member",
    "not_an_image": "one sample's .jpg holds text",
    "empty_caption": "one sample's .txt is empty",
    "non_utf8_caption": "one sample's .txt is not UTF-8",
    "decompression_bomb": f"one sample's image is a {BOMB_SIDE}x{BOMB_SIDE} PNG of a few KB",
    "json_without_uid": "one sample's .json (and its parquet row) has no uid",
    "duplicate_uid": "shard 00000001's first sample has the uid of shard 00000000's first",
    "missing_shard": "meta.json lists 2 shards, 00000001.tar is gone",
    "scores_wrong_types": "scores.parquet's score column holds strings",
    "scores_nan": "scores.parquet has NaN scores",
    "subset_wrong_dtype": "subset.npy is int64, not u8,u8",
    "subset_unsorted": "subset.npy's uids are not sorted",
    "task_truncated_tar": "the task's test shard test/1.tar cut off in the middle of a member",
    "task_not_an_image": "one test sample's .png holds text",
    "task_missing_label": "one test sample's .cls is not a number",
    "task_missing_shard": "test/nshards.txt says 2 shards, test/1.tar is gone",
}


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit PNG of a blank side x side canvas: a few KB on disk, side^2 pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _rewrite_tar(path: Path, change: Callable[[int, str, bytes], tuple[str, bytes] | None]) -> None:
    """Rewrite a shard, passing each member (sample index, name, data) through ``change``."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    keys = list(dict.fromkeys(name.partition(".")[0] for name, _ in members))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            changed = change(keys.index(name.partition(".")[0]), name, data)
            if changed is not None:
                info = tarfile.TarInfo(changed[0])
                info.size = len(changed[1])
                tar.addfile(info, io.BytesIO(changed[1]))


def _member(ext: str, new: Callable[[str, bytes], tuple[str, bytes]], sample: int = 0):
    """A ``change`` that replaces the ``ext`` member of one sample by ``new(name, data)``."""
    def change(index: int, name: str, data: bytes):
        return new(name, data) if index == sample and name.endswith("." + ext) else (name, data)
    return change


def _edit_parquet(path: Path, edit: Callable[[pd.DataFrame], None]) -> None:
    table = pd.read_parquet(path)
    edit(table)
    table.to_parquet(path, index=False)


def _truncate(tar: Path) -> None:
    """Cut a shard in its middle, as a copy or download stopped short leaves it."""
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])


def _inject_task(case: str, test: Path) -> None:
    first, second = test / "0.tar", test / "1.tar"
    if case == "task_truncated_tar":
        _truncate(second)
    elif case == "task_not_an_image":
        _rewrite_tar(first, _member("png", lambda n, d: (n, b"this is not an image")))
    elif case == "task_missing_label":
        _rewrite_tar(first, _member("cls", lambda n, d: (n, b"seven")))
    elif case == "task_missing_shard":
        second.unlink()
    else:
        raise ValueError(f"unknown fault case {case!r}: expected one of {sorted(CASES)}")


def _inject(case: str, root: Path, pool: Path, df: pd.DataFrame) -> None:
    first, second = pool / "00000000.tar", pool / "00000001.tar"
    if case == "truncated_tar":
        _truncate(second)
    elif case == "not_an_image":
        _rewrite_tar(first, _member("jpg", lambda n, d: (n, b"this is not an image")))
    elif case == "empty_caption":
        _rewrite_tar(first, _member("txt", lambda n, d: (n, b"")))
    elif case == "non_utf8_caption":
        _rewrite_tar(first, _member("txt", lambda n, d: (n, b"\xff\xfe a caption in no encoding")))
    elif case == "decompression_bomb":
        _rewrite_tar(first, _member("jpg", lambda n, d: (n.rsplit(".", 1)[0] + ".png", bomb_png())))
    elif case == "json_without_uid":
        def no_uid(name, data):
            meta = json.loads(data)
            del meta["uid"]
            return name, json.dumps(meta).encode()
        _rewrite_tar(first, _member("json", no_uid))
        _edit_parquet(first.with_suffix(".parquet"), lambda t: t.__setitem__("uid", [None] + list(t["uid"][1:])))
    elif case == "duplicate_uid":
        uid = df["uid"][0]

        def same_uid(name, data):
            return name, json.dumps({**json.loads(data), "uid": uid}).encode()
        _rewrite_tar(second, _member("json", same_uid))
        _edit_parquet(second.with_suffix(".parquet"), lambda t: t.__setitem__("uid", [uid] + list(t["uid"][1:])))
    elif case == "missing_shard":
        (pool / "meta.json").write_text(json.dumps({"output_shard_count": SHARDS}))
        second.unlink()
        second.with_suffix(".parquet").unlink()
    elif case.startswith("scores_"):
        scores = np.linspace(0, 1, len(df))
        if case == "scores_nan":
            scores[::4] = np.nan
        column = [f"{s:.3f}" for s in scores] if case == "scores_wrong_types" else scores
        pd.DataFrame({"uid": df["uid"], "score": column}).to_parquet(root / "scores.parquet", index=False)
    elif case.startswith("subset_"):
        from flyt.data.subset import uids_to_array

        rows = np.sort(uids_to_array(df["uid"].tolist()))
        if case == "subset_wrong_dtype":
            rows = rows["f1"].astype(np.int64)
        np.save(root / "subset.npy", rows[::-1] if case == "subset_unsorted" else rows)
    else:
        raise ValueError(f"unknown fault case {case!r}: expected one of {sorted(CASES)}")


def write_faulty_pool(out: str | Path, cases=tuple(CASES)) -> dict[str, Path]:
    """Write each case's folder under ``out``; returns case -> folder."""
    folders = {}
    for case in cases:
        root = Path(out) / case
        if case.startswith("task_"):
            task = toydata.write_task(root, name="task", n_train=1, n_test=8, n_test_shards=2)
            _inject_task(case, task.eval_dir / "test")
        else:
            df = toydata.write_pool(root / "pool", SAMPLES, n_shards=SHARDS, seed=0, corruption={})
            _inject(case, root, root / "pool", df)
        folders[case] = root
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write one small pool per injected fault (see docs/reliability.md).")
    parser.add_argument("out", help="folder to write OUT/<case>/ into")
    args = parser.parse_args(argv)
    for case, folder in write_faulty_pool(args.out).items():
        print(f"{folder}: {CASES[case]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
