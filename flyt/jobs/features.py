"""``flyt features`` as a per-shard job: M-FLYT's input scores for every sample of a pool shard.

A unit is a pool shard; its output is ``DIR/<shard>_scores.parquet`` (key, uid, one float column per
score and teacher), plus the shard's embedding cache with ``--save_embeddings``. Each worker loads every
model once (``setup``); images are decoded once per sample by a data loader over whole shards (flyt
score's), and every model applies its own transform to the decoded image. Scores are computed from the
float16-rounded embeddings that the cache stores, so a shard scored from the cache gets the same numbers.

negCLIPLoss's random batches are drawn within a shard (seeded by the seed and the shard's name): an
estimate over the pool as long as a shard is a random sample of it, as img2dataset's shards of a shuffled
list are. A sample is written once (the first shard holding its uid, as in flyt score) and only with
every column: one that cannot be decoded, lacks a metadata value or gets a non-finite score is skipped
and counted.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from flyt.data import embeddings as cache
from flyt.data.pool import Shard, first_copies
from flyt.errors import FlytError
from flyt.jobs.repeats import Repeats
from flyt.runner.job import Job, Unit

PER_TEACHER = ("clip_score", "neg_clip_loss", "normsim_inf", "normsim_2")
CHEAP = ("caption_words", "caption_chars", "image_width", "image_height", "image_aspect")
FLYT = "flyt"
DEFINITIONS = "_features.json"
WRITE_OPTIONS = {"compression": "zstd"}
_ALIAS = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Teacher:
    """``[ALIAS=]MODEL[:PRETRAINED]``: an OpenCLIP model, PRETRAINED an OpenCLIP tag or a local file."""

    alias: str | None
    model: str
    pretrained: str | None

    @property
    def label(self) -> str:
        return self.alias or "teacher"

    def definition(self) -> dict:
        pretrained = self.pretrained
        if pretrained and Path(pretrained).is_file():
            pretrained = str(Path(pretrained).resolve())
        return {"model": self.model, "pretrained": pretrained}


def parse_teacher(spec: str) -> Teacher:
    alias, eq, rest = spec.partition("=")
    if not eq:
        alias, rest = None, spec
    elif not _ALIAS.match(alias):
        raise FlytError(f"--teacher {spec}: the alias {alias!r} must be letters, digits or '_' (it names columns)")
    if rest.startswith(("hf-hub:", "local-dir:")):
        model, pretrained = rest, None
    else:
        model, _, pretrained = rest.partition(":")
    if not model:
        raise FlytError(f"--teacher {spec}: expected [ALIAS=]MODEL[:PRETRAINED]")
    return Teacher(alias, model, pretrained or None)


def check_teacher(teacher: Teacher) -> None:
    """A known OpenCLIP model and a known tag or readable checkpoint file, checked before anything loads."""
    import open_clip

    from flyt.models.networks import register_model_configs

    register_model_configs()
    name = teacher.model
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise FlytError(f"--teacher: {name!r} is not an OpenCLIP model name (see open_clip.list_models())")
    pretrained = teacher.pretrained
    if pretrained is None or pretrained in open_clip.list_pretrained_tags_by_model(name):
        return
    if not Path(pretrained).is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise FlytError(f"--teacher {name}:{pretrained}: neither a file nor an OpenCLIP tag of {name} (tags: {tags})")
    readable_checkpoint(pretrained, "--teacher")


def readable_checkpoint(path: str, flag: str) -> None:
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt"):
                return
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except Exception as exc:
        from flyt.models.checkpoint import refusal

        refused = refusal(f"{flag} {path}", exc)
        if refused:
            raise refused from None
        raise FlytError(f"{flag} {path} is not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


@dataclass(frozen=True)
class Column:
    name: str  # the output column
    score: str  # one of PER_TEACHER, CHEAP, FLYT, or "meta"
    teacher: Teacher | None = None
    source: str | None = None  # meta: the metadata column


def plan_columns(names: list[str], teachers: list[Teacher]) -> list[Column]:
    """The output columns of ``--scores``: ``<NAME>_<ALIAS>`` per teacher (``<NAME>`` for one unnamed teacher)."""
    known = (*PER_TEACHER, *CHEAP, FLYT, "meta:<column>")
    aliases = [t.alias for t in teachers]
    if len(teachers) > 1 and (None in aliases or len(set(aliases)) < len(aliases)):
        raise FlytError("--teacher: give each of several teachers its own alias (ALIAS=MODEL[:PRETRAINED])")
    columns = []
    for name in dict.fromkeys(names):
        if name in PER_TEACHER:
            if not teachers:
                raise FlytError(f"--scores {name} needs a --teacher")
            columns += [Column(f"{name}_{t.alias}" if t.alias else name, name, t) for t in teachers]
        elif name in CHEAP or name == FLYT:
            columns.append(Column(name, name))
        elif name.startswith("meta:") and len(name) > 5:
            columns.append(Column(name[5:], "meta", source=name[5:]))
        else:
            raise FlytError(f"--scores: unknown score {name!r} (expected some of {', '.join(known)})")
    repeated = [n for n, c in Counter(c.name for c in columns).items() if c > 1 or n in ("key", "uid")]
    if repeated:
        raise FlytError(f"--scores: two scores would write the column {repeated[0]!r}")
    return columns


@dataclass
class Settings:
    """What the job needs, as plain picklable values (the job travels to worker processes and Ray actors)."""

    shards: list[Shard]
    output: Path
    columns: list[Column]
    teachers: list[Teacher]
    targets: list[str] = field(default_factory=list)  # training shards of the target tasks
    neg_batch_size: int = 1024
    neg_batches: int = 10
    seed: int = 0
    flyt_checkpoint: str | None = None
    flyt_model: str | None = None
    save_embeddings: bool = False
    from_embeddings: Path | None = None
    cache_labels: dict = field(default_factory=dict)  # --from_embeddings: teacher label -> its label in the cache
    batch_size: int = 256
    workers: int = 4
    device: str | None = None
    precision: str = "fp32"
    repeats: Repeats = field(default_factory=lambda: Repeats({}, None, 0))  # uids an earlier shard holds

    def definitions(self) -> dict[str, dict]:
        """Each column's definition, kept in ``DIR/_features.json`` so that a rerun cannot mix two."""
        out = {}
        for c in self.columns:
            d = {"score": c.score}
            if c.teacher is not None:
                d["teacher"] = c.teacher.definition()
            if c.score == "neg_clip_loss":
                d.update(batch_size=self.neg_batch_size, batches=self.neg_batches, seed=self.seed)
            if c.score.startswith("normsim"):
                d["targets"] = sorted(str(Path(t).resolve()) for t in self.targets)
            if c.score == FLYT:
                d["checkpoint"] = str(Path(self.flyt_checkpoint).resolve())
            if c.source:
                d["column"] = c.source
            out[c.name] = d
        return out


def claim_columns(output: Path, definitions: dict[str, dict]) -> None:
    """Record the columns' definitions in ``DIR``, or refuse a folder whose columns are defined otherwise."""
    from flyt.atomic import atomic_path

    path = output / DEFINITIONS
    if path.exists():
        try:
            there = json.loads(path.read_text())["columns"]
        except (ValueError, KeyError, TypeError):
            raise FlytError(f"{path} is not readable: remove it together with the score files it describes") from None
        for name, d in definitions.items():
            if name in there and there[name] != d:
                raise FlytError(f"--output {output}: column {name!r} is already there with another definition "
                                f"({json.dumps(there[name])}, now {json.dumps(d)}): use another --output")
        if set(there) != set(definitions):
            raise FlytError(f"--output {output} holds the columns {', '.join(there)}, not {', '.join(definitions)}: "
                            "use another --output (flyt train --parquet_dir takes several folders joined by '::')")
        return
    if any(output.glob("*_scores.parquet")):
        raise FlytError(f"--output {output} already holds score files that flyt features did not write: use another folder")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"columns": definitions}, indent=1) + "\n")


class FeaturesJob(Job):
    title = "flyt features"

    def __init__(self, settings: Settings):
        self.s = settings

    def units(self) -> list[Unit]:
        return [Unit(shard.name, shard) for shard in self.s.shards]

    def outputs(self, unit: Unit) -> list[Path]:
        out = [self.s.output / f"{unit.name}_scores.parquet"]
        if self.s.save_embeddings:
            out = cache.shard_files(self.cache_root, unit.name, [t.label for t in self.s.teachers]) + out
        return out

    @property
    def cache_root(self) -> Path:
        return self.s.output / cache.FOLDER

    def resources(self) -> dict:
        gpu = (self.s.device or "").startswith("cuda") or (self.s.device is None and self.s.precision == "amp")
        return {"num_cpus": 1 + self.s.workers, "num_gpus": 1 if gpu else 0}

    def _needs(self, *scores: str) -> bool:
        return any(c.score in scores for c in self.s.columns)

    def setup(self):
        from flyt.jobs.feature_models import load_models

        return load_models(self.s, images=self.s.from_embeddings is None,
                           targets=self._needs("normsim_inf", "normsim_2"))

    def run(self, unit: Unit, state) -> dict:
        if self.s.from_embeddings is None:
            [(_, result)] = list(self.run_many([unit], state))
            if isinstance(result, BaseException):
                raise result
            return result
        labels = [self.s.cache_labels[t.label] for t in self.s.teachers]
        rows, arrays, stats = cache.read_shard(self.s.from_embeddings, unit.name, labels)
        embeddings = {t.label: arrays[label] for t, label in zip(self.s.teachers, labels)}
        return self.finish(unit.payload, rows, embeddings, None, Counter(stats.get("skipped", {})),
                           stats.get("read", len(rows["uid"])), state)

    def run_many(self, units: list[Unit], state):
        if self.s.from_embeddings is not None:
            yield from super().run_many(units, state)
            return
        from flyt.jobs.feature_models import pool_batches

        parts: dict[int, list] = defaultdict(list)
        for item in pool_batches([u.payload for u in units], self.s, state):
            index = item["shard"]
            if "error" in item:
                parts.pop(index, None)
                yield units[index], FlytError(f"cannot read shard {units[index].payload.path}: {item['error']}")
                continue
            parts[index].append(item)
            if item["last"]:
                try:
                    yield units[index], self._finish_batches(units[index].payload, parts.pop(index), state)
                except Exception as exc:  # one bad shard must not stop the others
                    yield units[index], exc

    def _finish_batches(self, shard: Shard, items: list[dict], state) -> dict:
        import torch

        rows = {name: [v for it in items for v in it[name]] for name in ("uid", "key", "text")}
        rows["image_width"] = [w for it in items for w, _ in it["size"]]
        rows["image_height"] = [h for it in items for _, h in it["size"]]
        embeddings = {}
        for teacher in self.s.teachers:
            pairs = [it["embeddings"][teacher.label] for it in items if it["uid"]]
            embeddings[teacher.label] = tuple(torch.cat([p[k] for p in pairs]) if pairs else torch.zeros(0, 1)
                                              for k in (0, 1))
        flyt = None
        if self._needs(FLYT):
            import numpy as np

            flyt = np.concatenate([it["flyt"] for it in items if it["uid"]] or [np.zeros(0, np.float32)])
        return self.finish(shard, rows, embeddings, flyt, Counter(items[-1]["skipped"]),
                           sum(it["read"] for it in items), state)

    def finish(self, shard: Shard, rows: dict, embeddings: dict, flyt, skipped: Counter, read: int, state) -> dict:
        """Keep each uid's first copy, save the cache, compute every column, drop incomplete rows, write."""
        import numpy as np
        import torch

        keep = first_copies(rows["uid"], self.s.repeats.of(shard.name))
        skipped["repeated_uid"] += int((~keep).sum())
        rows = {k: [v for v, f in zip(values, keep) if f] for k, values in rows.items()}
        mask = torch.as_tensor(keep)
        embeddings = {k: tuple(torch.as_tensor(a)[mask] if len(a) else torch.as_tensor(a) for a in pair)
                      for k, pair in embeddings.items()}
        flyt = None if flyt is None else flyt[keep]
        skipped = +skipped
        stats = {"shard": str(shard.path), "read": int(read), "skipped": dict(sorted(skipped.items()))}
        if self.s.save_embeddings:
            cache.write_shard(self.cache_root, shard.name, rows,
                              {k: tuple(a.cpu().numpy() for a in pair) for k, pair in embeddings.items()}, stats)
        values, missing_meta = self._columns(shard, rows, embeddings, flyt, state)
        complete = np.ones(len(rows["uid"]), bool)
        for column in values.values():
            complete &= np.isfinite(column)
        skipped["missing_meta"] += int(missing_meta.sum())
        skipped["nonfinite_score"] += int((~complete & ~missing_meta).sum())
        stats.update(samples=int(complete.sum()), skipped=dict(sorted((+skipped).items())))
        self._write(shard, rows, values, complete, stats)
        return stats

    def _columns(self, shard: Shard, rows: dict, embeddings: dict, flyt, state) -> tuple[dict, object]:
        """Every column's values (float, NaN where a metadata value is missing) and that missing mask."""
        import numpy as np
        import torch

        from flyt.method import input_scores as m

        n = len(rows["uid"])
        rounds = None
        if self._needs("neg_clip_loss"):
            rng = np.random.default_rng([self.s.seed, zlib.crc32(shard.name.encode())])
            rounds = m.batch_assignment(n, self.s.neg_batch_size, self.s.neg_batches, rng)
        words = np.array([len(t.split()) for t in rows["text"]], np.float32)
        chars = np.array([len(t) for t in rows["text"]], np.float32)
        width, height = (np.array(rows[k], np.float32) for k in ("image_width", "image_height"))
        cheap = {"caption_words": words, "caption_chars": chars, "image_width": width, "image_height": height,
                 "image_aspect": width / np.maximum(height, 1)}
        meta, missing = self._meta(shard, rows["uid"]) if self._needs("meta") else ({}, np.zeros(n, bool))
        out = {}
        device = state.get("device", torch.device("cpu"))
        for c in self.s.columns:
            if c.teacher is not None:
                image, text = (a.to(device) for a in embeddings[c.teacher.label])
                if c.score == "clip_score":
                    value = m.clip_score(image, text)
                elif c.score == "neg_clip_loss":
                    value = m.neg_clip_loss(image, text, state["logit_scale"][c.teacher.label],
                                            self.s.neg_batch_size, rounds)
                else:
                    value = m.normsim(image, state["targets"][c.teacher.label].to(device),
                                      math.inf if c.score == "normsim_inf" else 2.0)
                out[c.name] = value.cpu().numpy().astype(np.float32) if n else np.zeros(0, np.float32)
            elif c.score == FLYT:
                out[c.name] = flyt.astype(np.float32)
            elif c.score == "meta":
                out[c.name] = meta[c.source]
            else:
                out[c.name] = cheap[c.score]
        return out, missing

    def _meta(self, shard: Shard, uids: list[str]) -> tuple[dict, object]:
        """The ``meta:`` columns for these uids from the shard's metadata parquet (NaN where missing)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from flyt.data.subset import valid_uids

        sources = [c.source for c in self.s.columns if c.score == "meta"]
        table = pq.read_table(shard.metadata, columns=["uid", *sources])
        ids = valid_uids(table["uid"])[0]
        at = pc.fill_null(pc.index_in(pa.array(uids, pa.string()), value_set=ids), -1).to_numpy(zero_copy_only=False)
        out, missing = {}, at < 0
        for name in sources:
            values = np.append(table[name].cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64), np.nan)
            out[name] = values[at]  # -1: the NaN appended
            missing |= np.isnan(out[name])
        return out, missing

    def _write(self, shard: Shard, rows: dict, values: dict, keep, stats: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from flyt.atomic import atomic_file

        def pick(seq):
            return [v for v, k in zip(seq, keep) if k]

        columns = {"key": pa.array(pick(rows["key"]), pa.string()), "uid": pa.array(pick(rows["uid"]), pa.string())}
        for c in self.s.columns:
            dtype = pa.float64() if c.score == "meta" else pa.float32()
            columns[c.name] = pa.array(values[c.name][keep], dtype)
        table = pa.table(columns).replace_schema_metadata({b"flyt_features": json.dumps(stats).encode()})
        with atomic_file(self.s.output / f"{shard.name}_scores.parquet") as f:
            pq.write_table(table, f, **WRITE_OPTIONS)
