"""Finding WebDataset shards: a folder (recursive), one .tar, resharder output, or ``a::b`` sources."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flyt.errors import FlytError, remote_hint


@dataclass(frozen=True)
class Source:
    shards: tuple[str, ...]
    weight: float = 1.0


def list_shards(path: str | Path, flag: str) -> list[str]:
    """Every .tar of one source, sorted. A DataComp resharder folder's meta.json is checked."""
    given, path = path, Path(path)
    if path.is_file():
        if path.suffix != ".tar":
            raise FlytError(f"{flag}: {path} is not a .tar shard")
        return [str(path)]
    if not path.is_dir():
        raise FlytError(f"{flag}: {given} does not exist{remote_hint(given)}")
    shards = sorted(str(p) for p in path.rglob("*.tar"))
    meta = path / "meta.json"
    if meta.exists():
        try:
            count = int(json.loads(meta.read_text())["output_shard_count"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FlytError(f"{meta}: expected JSON with an integer 'output_shard_count' ({exc})") from None
        if count != len(shards):
            raise FlytError(f"{meta} says {count} shards but {path} holds {len(shards)} .tar files")
    if not shards:
        raise FlytError(f"{flag}: no .tar shards under {path}")
    return shards


def parse_sources(spec: str, weights: str | None = None, flag: str = "--upstream_data_dir") -> list[Source]:
    """``a::b`` with optional weights ``1::2``: each shard of a source is drawn with its source's weight."""
    paths = [p for p in spec.split("::") if p]
    if not paths:
        raise FlytError(f"{flag} is empty")
    values = parse_weights(weights, len(paths), "--data_weights") or [1.0] * len(paths)
    return [Source(tuple(list_shards(p, flag)), w) for p, w in zip(paths, values)]


def parse_weights(spec: str | None, n: int, flag: str) -> list[float] | None:
    """``1::2`` -> [1.0, 2.0]: exactly ``n`` positive numbers, or None when the flag is not given."""
    if spec is None:
        return None
    try:
        values = [float(w) for w in spec.split("::")]
    except ValueError:
        values = []
    if len(values) != n or any(v <= 0 for v in values):
        raise FlytError(f"{flag} {spec!r}: expected {n} positive number(s) joined by '::', e.g. 1::2")
    return values
