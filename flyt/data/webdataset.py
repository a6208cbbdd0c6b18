"""Reading WebDataset shards: every reader of flyt's tars goes through here.

A sample is the run of consecutive tar members sharing a key (the member name up to the first dot of
its base name); it comes back as a dict of lower-cased extension -> bytes plus ``__key__``.

Two readers, one sample format: :func:`tar_samples` streams shards with webdataset's own iteration
(the training and evaluation streams; it imports torch, as webdataset does); :func:`iter_tar` reads one
local shard with random access, so ``only=("json",)`` seeks past the images instead of reading them,
and it stays torch-free (``flyt score`` of an M-FLYT pool lists ids without loading torch).
"""

from __future__ import annotations

import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

from flyt.errors import FlytError


def tar_samples(shards: Iterable[str | dict], on_damage: Callable[[str, str, int], None] | None = None
                ) -> Iterator[dict]:
    """The samples of the shards in order (paths, or webdataset's ``{"url": ...}`` dicts, e.g. a resampled
    stream of them), each with ``__url__``. A shard that cannot be read to its end (truncated, not a tar,
    a duplicated member) is a one-line :class:`FlytError` naming it; with ``on_damage``, the samples before
    the damage are kept and ``on_damage(url, message, samples_read)`` is called instead, then the next
    shard is read. Each shard is grouped on its own, so a broken one never lends members to the next."""
    from webdataset import tariterators

    for shard in shards:
        source = shard if isinstance(shard, dict) else {"url": str(shard)}
        read = 0
        try:
            # the file is opened here, not by webdataset's URL opener, which runs a "pipe:..." name as a shell
            # command: a shard is a local file, whatever its name says
            with open(source["url"], "rb") as stream:
                members = tariterators.tar_file_expander([{**source, "stream": stream}],
                                                         handler=tariterators.reraise_exception)
                for sample in tariterators.group_by_keys(members, handler=tariterators.reraise_exception):
                    read += 1
                    yield sample
        except Exception as exc:  # webdataset's errors do not name the shard in a readable way
            reason = str(exc.args[0] if exc.args else exc).split(" @ <_io.")[0]  # webdataset appends the stream
            message = f"cannot read {source['url']}: {reason}"
            if on_damage is None:
                raise FlytError(message) from None
            on_damage(source["url"], message, read)


NAMED: set[str] = set()  # the damaged shards this process has named: a shard drawn again and again is named once


def name_damaged(damaged: Iterable[tuple[str, str]]) -> None:
    """Print the line of each (shard, line) not named yet by this process. DataLoader workers are processes
    of their own, so they hand their damaged shards to the main one in their items, which names them here:
    once per run, however many workers read the shard."""
    for url, line in damaged:
        if url not in NAMED:
            NAMED.add(url)
            print(line, file=sys.stderr, flush=True)


class DamagedShards:
    """A training stream's ``on_damage``: a shard that breaks off costs only what follows the damage.

    Each broken read counts once in ``skipped["damaged_shard"]``. The shard is named on stderr by
    :func:`name_damaged`, or, with ``forward`` (a list, in a DataLoader worker), its (shard, line) is
    appended there once for the stream to pass on in its next item. When every one of the ``shards``
    distinct shards broke before its first sample, nothing can ever be read: a :class:`FlytError`
    instead of an endless loop over them."""

    def __init__(self, skipped: Counter, shards: int | None = None, forward: list | None = None):
        self.skipped, self.shards, self.forward, self.empty, self.forwarded = skipped, shards, forward, set(), set()

    def __call__(self, url: str, message: str, samples_read: int) -> None:
        self.skipped["damaged_shard"] += 1
        line = f"flyt: skipping the rest of a damaged shard ({samples_read} samples kept): {message}"
        if self.forward is None:
            name_damaged([(url, line)])
        elif url not in self.forwarded:
            self.forwarded.add(url)
            self.forward.append((url, line))
        if samples_read == 0:
            self.empty.add(url)
            if self.shards is not None and len(self.empty) >= self.shards:
                raise FlytError(f"no shard can be read: {message}")


def drain(found: list | None) -> list:
    """The (shard, line) pairs collected since the last call (none outside a worker), for a stream's item."""
    if not found:
        return []
    items = list(found)
    found.clear()
    return items


def member_name(name: str) -> tuple[str, str]:
    """(sample key, extension as written) of a tar member, as WebDataset splits it: the key ends at the
    base name's first dot (``a/b.seg.png`` -> ``a/b``, ``seg.png``); consecutive members sharing a key form
    a sample. ``flyt reshard`` renames members by it and keeps the extension's case."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


def split_member(name: str) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a member name, or None for a name that is not a sample's
    file (no extension, a hidden file)."""
    base = name.rpartition("/")[2]
    if "." not in base or base.startswith("."):
        return None
    key, ext = member_name(name)
    return key, ext.lower()


def iter_tar(path: str | Path, only: tuple[str, ...] | None = None) -> Iterator[dict]:
    """The samples of one local shard, read with random access. With ``only``, the other members' data
    is never read (a sample without any of them still comes back, with ``__key__`` alone)."""
    with tarfile.open(path, "r") as tar:
        sample = None
        for member in tar:
            split = split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            key, ext = split
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample, exts = {"__key__": key}, set()
            if ext in exts:  # webdataset refuses it too: one of the two would be lost
                raise FlytError(f"cannot read {path}: sample {key} has two .{ext} members")
            exts.add(ext)
            if only is None or ext in only:
                sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
