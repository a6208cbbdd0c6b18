"""Small DataComp-like experiments built from real images: scikit-learn's 1797 handwritten 8x8 digits.

Why this exists: the test suite, the benchmarks and the end-to-end demo need an upstream pool, M-FLYT
input-score files and downstream tasks in exactly the on-disk formats of DataComp / img2dataset and
of the original FLYT code (docs/formats.md), with a *known* ground truth (which pairs are clean, which
corrupted, which undecodable) so that a filter's quality can be measured -- offline, in seconds, and
byte-for-byte reproducible from a seed. Real images (upscaled, tinted, jittered) make the learning
problem honest while staying tiny.

The 1797 images are split once, independently of any seed, into disjoint ``"pool"``, ``"train"`` and
``"test"`` subsets (:func:`split_indices`), so a pool never shares an image with a task's test set
unless the caller asks for it. scikit-learn is imported only when images are first needed.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from flyt.atomic import atomic_path
from flyt.data.tasks import CLASSNAMES, ORIGINAL_TASKS, TEMPLATES
from flyt.commands.reshard import shard_stats

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CORRUPTIONS = ("wrong_caption", "unrelated_caption", "noise_image", "near_duplicate")
# Pool captions: {n} is the digit's name, {d} its numeral.
CAPTION_TEMPLATES = (
    "a photo of the number {n}", "handwritten {d}", "the digit {n} written by hand", "a handwritten {n}",
    "a scan of a handwritten digit {d}", "number {n}", "{d}", "a small picture of the digit {n}",
    "the number {n} in ink", "digit: {d}",
)
ZEROSHOT_TEMPLATES = (
    "a photo of the number {c}.", "a handwritten {c}.", "the digit {c}.", "a picture of the digit {c}.",
    "a scan of a handwritten {c}.", "the number {c}, written by hand.",
)
# Captions unrelated to digits (no digit names or numerals in them).
_SUBJECTS = ("a dog", "a red bicycle", "a cup of coffee", "an old car", "a small boat", "a bowl of soup",
             "a tabby cat", "a wooden chair", "a bunch of bananas", "a pair of shoes", "a yellow umbrella")
_PLACES = ("on a sunny beach", "in the kitchen", "next to a window", "at the park", "on a city street",
           "in the snow", "under a tree", "on a wooden table", "at night", "in a living room")
_PREFIXES = ("", "photo of ", "close-up of ", "stock image: ")

SPLIT_FRACTIONS = (("pool", 0.6), ("train", 0.2), ("test", 0.2))
_SPLIT_SEED = 1797  # fixed on purpose: the image splits never depend on the caller's seed
_MTIME = 1_700_000_000  # fixed tar member mtime, for byte-identical shards
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_BROKEN_PREFIX = 16  # bytes kept of a valid encoding: the signature survives, nothing decodes


# ----------------------------------------------------------------------------- images and splits

@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) in 0..255, targets int64), loaded once from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.round(data.images * (255 / 16)), 0, 255).astype(np.uint8)
    return images, data.target.astype(np.int64)


def split_indices(split: str | Sequence[int] | None) -> np.ndarray:
    """Indices into the 1797 digits: ``None`` = all, ``"pool"``/``"train"``/``"test"`` = fixed disjoint
    subsets (60/20/20 % of one fixed permutation), or an explicit sequence of indices."""
    n = len(_digits()[1])
    if split is None:
        return np.arange(n)
    if isinstance(split, str):
        names = [name for name, _ in SPLIT_FRACTIONS]
        if split not in names:
            raise ValueError(f"unknown split {split!r}: expected one of {names}, None or a sequence of indices")
        perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
        bounds = np.round(np.cumsum([0] + [f for _, f in SPLIT_FRACTIONS]) * n).astype(int)
        i = names.index(split)
        return np.sort(perm[bounds[i]:bounds[i + 1]])
    idx = np.asarray(split, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"image indices must lie in [0, {n})")
    return idx


def _images_of(split, digits: Iterable[int] | None) -> np.ndarray:
    idx = split_indices(split)
    if digits is not None:
        idx = idx[np.isin(_digits()[1][idx], list(digits))]
    if idx.size == 0:
        raise ValueError(f"no digit images in split {split!r} for digits {digits}")
    return idx


def _draw(indices: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, each image used as evenly as possible (whole shuffled passes, then a partial one)."""
    reps = -(-n // len(indices)) if n else 0
    return np.concatenate([rng.permutation(indices) for _ in range(reps)] or [indices[:0]])[:n]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per purpose (and per sample), so e.g. uids do not move when corruptions do."""
    return np.random.default_rng([seed, *stream])


def _render(index: int, size: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """Digit ``index`` as a (size, size, 3) uint8 image: bicubic upscale, then a random tint and shift."""
    small = Image.fromarray(_digits()[0][index])  # 2-D uint8: mode "L"
    gray = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255
    if not augment:
        return np.repeat(np.round(gray * 255).astype(np.uint8)[..., None], 3, axis=2)
    s = max(1, size // 16)
    dy, dx = rng.integers(0, 2 * s + 1, size=2)
    gray = np.pad(gray, s)[dy:dy + size, dx:dx + size]
    bg, fg = rng.uniform(0.0, 0.3, 3), rng.uniform(0.65, 1.0, 3)
    rgb = bg + (fg - bg) * np.clip(gray, 0, 1)[..., None]
    return np.round(rgb * 255).astype(np.uint8)


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    fmt = _PIL_FORMATS[image_format]
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def _check_format(image_format: str) -> None:
    if image_format not in _PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_PIL_FORMATS)}, not {image_format!r}")


# ----------------------------------------------------------------------------- shards

def _write_tar(path: Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> Path:
    """One WebDataset shard, atomically; member order and headers are fixed, so equal input gives equal bytes."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def _shard_layout(n: int, n_shards: int) -> tuple[np.ndarray, list[str]]:
    """(shard id per sample, img2dataset key per sample): contiguous shards of near-equal size."""
    if not 1 <= n_shards <= max(n, 1):
        raise ValueError(f"n_shards must be between 1 and the number of samples ({n}), not {n_shards}")
    shard = np.repeat(np.arange(n_shards), [len(c) for c in np.array_split(np.arange(n), n_shards)])
    if n and np.bincount(shard).max() > 10_000:
        raise ValueError("at most 10000 samples per shard (4-digit index in the key): use more shards")
    index = np.arange(n) - np.searchsorted(shard, shard)
    return shard, [f"{s:08d}{i:04d}" for s, i in zip(shard, index)]


def _uids(seed: int, n: int) -> list[str]:
    rng = _rng(seed, 0)
    uids = [rng.bytes(16).hex() for _ in range(n)]
    while len(set(uids)) < n:  # astronomically unlikely; stays deterministic if it ever happens
        uids = [rng.bytes(16).hex() for _ in range(n)]
    return uids


# ----------------------------------------------------------------------------- upstream pool

def _corruption_counts(corruption: Mapping[str, float], n_samples: int) -> dict[str, int]:
    unknown = set(corruption) - set(CORRUPTIONS)
    if unknown:
        raise ValueError(f"unknown corruption kinds {sorted(unknown)}: expected some of {CORRUPTIONS}")
    if any(not 0 <= f <= 1 for f in corruption.values()):
        raise ValueError(f"corruption fractions must lie in [0, 1]: {dict(corruption)}")
    counts = {k: int(round(corruption.get(k, 0) * n_samples)) for k in CORRUPTIONS}
    n_clean = n_samples - sum(counts.values())
    if n_clean < 0:
        raise ValueError(f"corruption fractions add up to more than the whole pool: {dict(corruption)}")
    if counts["near_duplicate"] and not n_clean:
        raise ValueError("near_duplicate needs at least one clean sample to copy")
    return counts


def write_pool(out_dir, n_samples: int, n_shards: int = 4, seed: int = 0, image_size: int = 32,
               corruption: Mapping[str, float] | None = None, n_broken: int = 0, image_format: str = "jpg",
               digits: Iterable[int] | None = None, split: str | Sequence[int] | None = "pool",
               augment: bool = True) -> pd.DataFrame:
    """Write an upstream pool as img2dataset lays it out (per shard ``NNNNNNNN.tar``, ``NNNNNNNN.parquet``,
    ``NNNNNNNN_stats.json``) and return its ground truth, one row per sample.

    ``corruption`` maps a kind of :data:`CORRUPTIONS` to its fraction of ``n_samples`` (rounded);
    ``n_broken`` undecodable samples come on top. Images come from ``split`` (see :func:`split_indices`),
    restricted to ``digits`` if given. Columns: uid, key, shard, caption, label (the image's digit, -1 for
    noise and broken), kind, clean (kind == "clean"), aligned (caption describes the image: clean and
    near-duplicates), caption_digit (-1 if none), image_index (into the 1797 digits, -1 if none), source
    (row a near-duplicate copies, else -1), url and the two CLIP-like scores.
    """
    _check_format(image_format)
    if n_samples < 0 or n_broken < 0:
        raise ValueError("n_samples and n_broken must be non-negative")
    counts = _corruption_counts({"wrong_caption": 0.5} if corruption is None else corruption, n_samples)
    total = n_samples + n_broken
    shard, keys = _shard_layout(total, n_shards)
    rng = _rng(seed, 1)
    kind = rng.permutation(np.array(["clean"] * (n_samples - sum(counts.values()))
                                    + [k for k in CORRUPTIONS for _ in range(counts[k])]
                                    + ["broken"] * n_broken, dtype=object))
    image_index = _draw(_images_of(split, digits), total, rng)
    label = _digits()[1][image_index]
    caption_digit = label.copy()
    wrong = kind == "wrong_caption"
    caption_digit[wrong] = (label[wrong] + rng.integers(1, 10, wrong.sum())) % 10
    template = rng.integers(len(CAPTION_TEMPLATES), size=total)
    captions = [CAPTION_TEMPLATES[t].format(n=DIGIT_NAMES[d], d=d) for t, d in zip(template, caption_digit)]
    for i in np.flatnonzero(kind == "unrelated_caption"):
        captions[i] = str(rng.choice(_PREFIXES) + rng.choice(_SUBJECTS) + " " + rng.choice(_PLACES)).strip()
        caption_digit[i] = -1
    source = np.full(total, -1)
    dup = np.flatnonzero(kind == "near_duplicate")
    source[dup] = rng.choice(np.flatnonzero(kind == "clean"), size=dup.size)
    for i in dup:
        image_index[i], label[i], caption_digit[i], captions[i] = (
            image_index[source[i]], label[source[i]], caption_digit[source[i]], captions[source[i]])
    no_image = np.isin(kind, ["noise_image", "broken"])
    label[no_image], image_index[no_image] = -1, -1
    aligned = np.isin(kind, ["clean", "near_duplicate"])
    uids = _uids(seed, total)
    srng = _rng(seed, 2)  # weakly informative CLIP-like scores: aligned pairs higher, lots of noise
    df = pd.DataFrame({
        "uid": uids, "key": keys, "shard": [f"{s:08d}" for s in shard], "caption": captions,
        "label": label, "kind": kind.astype(str), "clean": kind == "clean", "aligned": aligned,
        "caption_digit": caption_digit, "image_index": image_index, "source": source,
        "url": [f"https://example.invalid/{u}.{image_format}" for u in uids],
        "clip_b32_similarity_score": (0.22 + 0.04 * aligned + srng.normal(0, 0.045, total)).astype(np.float32),
        "clip_l14_similarity_score": (0.20 + 0.05 * aligned + srng.normal(0, 0.045, total)).astype(np.float32),
    })

    def pixels(i: int) -> np.ndarray:
        if kind[i] in ("noise_image", "broken"):
            return _rng(seed, 3, i).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        own = _render(image_index[i], image_size, _rng(seed, 3, source[i] if source[i] >= 0 else i), augment)
        if kind[i] != "near_duplicate":
            return own
        jitter = _rng(seed, 4, i).integers(-3, 4, own.shape)
        return np.clip(own.astype(np.int64) + jitter, 0, 255).astype(np.uint8)

    def sample(i: int) -> tuple[str, dict[str, bytes]]:
        image = _encode(pixels(i), image_format)
        meta = {"uid": uids[i], "key": keys[i], "url": df["url"][i], "caption": captions[i], "status": "success"}
        return keys[i], {image_format: image[:_BROKEN_PREFIX] if kind[i] == "broken" else image,
                         "txt": captions[i].encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}

    out_dir = Path(out_dir)
    for s in range(n_shards):
        rows = np.flatnonzero(shard == s)
        _write_tar(out_dir / f"{s:08d}.tar", (sample(i) for i in rows))
        table = df.iloc[rows][["uid", "key", "url", "caption", "clip_b32_similarity_score",
                               "clip_l14_similarity_score"]].rename(columns={"caption": "text"})
        with atomic_path(out_dir / f"{s:08d}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        with atomic_path(out_dir / f"{s:08d}_stats.json") as tmp:  # fixed clock: byte-reproducible pools
            tmp.write_text(json.dumps(shard_stats(len(rows), _MTIME, _MTIME), indent=4))
    return df


# ----------------------------------------------------------------------------- M-FLYT input scores

def write_score_parquets(pool_df: pd.DataFrame, out_dir, seed: int = 0,
                         columns: Sequence[str] = ("informative", "noise_a", "noise_b"), dtype="float64",
                         informative: Iterable[str] = ("informative",), noise: float = 0.6) -> list[Path]:
    """Write ``out_dir/<key[:8]>_scores.parquet`` (columns key, uid, *columns), one per shard of the pool.

    Columns named in ``informative`` are clean-ness (0/1) plus gaussian noise of std ``noise`` -- useful
    but imperfect; the others are pure standard-normal noise. Integer dtypes store round(100 * score),
    clipped to the type's range (shifted to start at 0 for unsigned types).
    """
    dtype, informative = np.dtype(dtype), set(informative)
    if dtype.kind not in "iuf":
        raise ValueError(f"score dtype must be numeric (int, uint or float), not {dtype}")
    df = pool_df.sort_values("key", kind="stable")[["key", "uid", "clean"]].reset_index(drop=True)
    rng = _rng(seed, 5)
    for col in columns:
        values = rng.normal(0.0, 1.0, len(df))
        if col in informative:
            values = df["clean"].to_numpy(dtype=np.float64) + noise * values
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            values = np.clip(np.round(100 * (values - (values.min() if dtype.kind == "u" else 0))), info.min, info.max)
        df[col] = values.astype(dtype)
    df = df.drop(columns="clean")
    paths = []
    for shard, part in df.groupby(df["key"].str[:8], sort=True):
        paths.append(Path(out_dir) / f"{shard}_scores.parquet")
        with atomic_path(paths[-1]) as tmp:
            part.to_parquet(tmp, index=False)
    return paths


# ----------------------------------------------------------------------------- downstream tasks

@dataclass(frozen=True, eq=False)
class TaskFiles:
    """What :func:`write_task` wrote. ``downstream_data_dir``/``datacomp_eval_dir`` are the values for the
    CLI flags of the same names (``datacomp_eval_dir`` is None for the simple layout, which needs none)."""

    name: str
    train_dir: Path
    eval_dir: Path  # classnames.txt, zeroshot_classification_templates.txt, test/*.tar
    train_shards: tuple[Path, ...]
    test_shards: tuple[Path, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    downstream_data_dir: Path
    datacomp_eval_dir: Path | None
    samples: pd.DataFrame  # split, key, shard, label, digit, image_index


def _check_lines(lines: Sequence[str], what: str) -> tuple[str, ...]:
    lines = tuple(lines)
    if not lines or any(not line.strip() or "\n" in line for line in lines):
        raise ValueError(f"{what} must be non-empty single-line strings")
    return lines


def write_task(out_dir, name: str | None = None, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0, image_size: int = 32, layout: str = "simple",
               classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None,
               digits_subset: Sequence[int] | None = None, train_split: str | Sequence[int] | None = "train",
               test_split: str | Sequence[int] | None = "test", n_train_shards: int = 1, n_test_shards: int = 1,
               image_format: str = "png", augment: bool = True) -> TaskFiles:
    """Write a digit-classification task: training shards (image, ``cls``, ``txt``), test shards in the
    DataComp eval format (image, ``cls``) and the class-name and template files.

    Labels are 0..k-1 over ``digits_subset`` (default all ten digits). ``n_train``/``n_test`` default to
    every image of ``train_split``/``test_split`` (more than that reuses images with other tints/shifts).
    ``layout="simple"``: ``out_dir/<name>/{train/00000000.tar, test/{0.tar, nshards.txt}, classnames.txt,
    templates}`` (name defaults to "digits"; name it ``wds_<task>_test`` for clip_benchmark's layout). ``layout="original"``: ``out_dir/downstream/<folder>/00000000.tar`` and
    ``out_dir/eval/wds_<task>_test/{test/{0.tar, nshards.txt}, text files}`` with the original folder names (name
    defaults to "mnist").
    """
    _check_format(image_format)
    if layout not in ("simple", "original"):
        raise ValueError(f"layout must be 'simple' or 'original', not {layout!r}")
    out_dir = Path(out_dir)
    digits = list(range(10)) if digits_subset is None else [int(d) for d in digits_subset]
    if not digits or len(set(digits)) != len(digits) or not set(digits) <= set(range(10)):
        raise ValueError(f"digits_subset must be distinct digits 0..9, not {digits_subset}")
    classnames = _check_lines([DIGIT_NAMES[d] for d in digits] if classnames is None else classnames, "classnames")
    templates = _check_lines(ZEROSHOT_TEMPLATES if templates is None else templates, "templates")
    if len(classnames) != len(digits):
        raise ValueError(f"{len(classnames)} class names for {len(digits)} classes")
    if any("{c}" not in t for t in templates):
        raise ValueError("every template must contain {c}, the class name's place")
    if layout == "simple":
        name = name or "digits"
        eval_dir = out_dir / name
        train_dir, downstream_data_dir, datacomp_eval_dir = eval_dir / "train", out_dir, None
    else:
        name = name or "mnist"
        train_folder, eval_folder = ORIGINAL_TASKS.get(name, (name, f"wds_{name}_test"))
        downstream_data_dir, datacomp_eval_dir = out_dir / "downstream", out_dir / "eval"
        train_dir, eval_dir = downstream_data_dir / train_folder, datacomp_eval_dir / eval_folder
    position = np.full(10, -1)
    position[digits] = np.arange(len(digits))
    rng = _rng(seed, 6)

    def write_split(split, images, n, n_shards, folder, shard_name, stream):
        candidates = _images_of(images, digits)
        image_index = _draw(candidates, len(candidates) if n is None else n, rng)
        digit = _digits()[1][image_index]
        label = position[digit]
        shard, keys = _shard_layout(len(image_index), n_shards)
        caption_template = rng.integers(len(templates), size=len(image_index))

        def sample(i: int) -> tuple[str, dict[str, bytes]]:
            pixels = _render(image_index[i], image_size, _rng(seed, stream, i), augment)
            members = {image_format: _encode(pixels, image_format), "cls": str(label[i]).encode("ascii")}
            if split == "train":
                caption = templates[caption_template[i]].replace("{c}", classnames[label[i]])
                members["txt"] = caption.encode("utf-8")
            return keys[i], members

        paths = tuple(_write_tar(folder / shard_name.format(s), (sample(i) for i in np.flatnonzero(shard == s)))
                      for s in range(n_shards))
        frame = pd.DataFrame({"split": split, "key": keys, "shard": [paths[s].stem for s in shard],
                              "label": label, "digit": digit, "image_index": image_index})
        return paths, frame

    train_shards, train_df = write_split("train", train_split, n_train, n_train_shards, train_dir, "{:08d}.tar", 7)
    test_shards, test_df = write_split("test", test_split, n_test, n_test_shards, eval_dir / "test", "{}.tar", 8)
    with atomic_path(eval_dir / "test" / "nshards.txt") as tmp:  # clip_benchmark's wds loader reads the count
        tmp.write_text(f"{n_test_shards}\n")
    for filename, lines in ((CLASSNAMES, classnames), (TEMPLATES, templates)):
        with atomic_path(eval_dir / filename) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return TaskFiles(name, train_dir, eval_dir, train_shards, test_shards, classnames, templates,
                     downstream_data_dir, datacomp_eval_dir, pd.concat([train_df, test_df], ignore_index=True))
