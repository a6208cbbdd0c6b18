"""``flyt score`` as a per-shard job: a unit is a pool shard, its output the shard's parquet file.

The job carries only settings (it travels to worker processes and Ray actors); each worker's ``setup``
loads the checkpoint (and, for M-FLYT, builds the mixer over the input scores) once. A worker reads the
uids that an earlier shard of the sorted pool holds (:mod:`flyt.jobs.repeats`, computed from the ids
alone), so whichever worker, split or engine scores a shard, a repeated uid is written once, by its first
shard.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flyt.data.pool import Shard
from flyt.data.score_files import Output
from flyt.errors import FlytError
from flyt.jobs.repeats import Repeats
from flyt.runner.job import Job, Unit


class ScoreJob(Job):
    title = "flyt score"

    def __init__(self, shards: list[Shard], output: Output, checkpoint: str, model: str | None,
                 parquet_fields: list[str] | None, parquet_dir: str | None, batch_size: int, workers: int,
                 device: str | None, precision: str | None):
        self.shards, self.output, self.checkpoint, self.model = shards, output, checkpoint, model
        self.parquet_fields, self.parquet_dir = parquet_fields, parquet_dir
        self.batch_size, self.workers, self.device, self.precision = batch_size, workers, device, precision
        self.mode, self.mixer = None, None  # set by ``check``: the checkpoint's mode, M-FLYT's (fields, weight, bias)
        self.num_gpus = 0  # set by the command: GPUs per Ray actor
        self.repeats = Repeats({}, None, 0)  # set by the command (``flyt.jobs.repeats.pending_repeats``)
        self._state = None

    def __getstate__(self) -> dict:
        """What a worker gets: the settings. It loads its own model, and its units carry their shard (a huge
        pool's shard list stays with the driver)."""
        return {**self.__dict__, "_state": None, "shards": []}

    # ------------------------------------------------------------------------------------------ the job

    def units(self) -> list[Unit]:
        return [Unit(shard.name, shard) for shard in self.shards]

    def outputs(self, unit: Unit) -> list[Path]:
        return [self.output.part(unit.payload)]

    def resources(self) -> dict:
        if self.mode == "mflyt":
            return {"num_cpus": 1}
        return {"num_cpus": max(1, self.workers), "num_gpus": self.num_gpus}

    @property
    def units_per_call(self) -> int:
        """FLYT: a shard per data-loader process, so that a Ray actor's loader reads in parallel too."""
        return 1 if self.mode == "mflyt" else max(1, self.workers)

    def setup(self):
        """(mode, what scores): the mixer, or (model, spec, device, precision); built once per worker."""
        if self._state is None:
            if self.mixer is not None:
                self._state = ("mflyt", self._mixer())
            else:
                from flyt.precision import resolve_device, resolve_precision

                precision = resolve_precision(self.precision)
                device = resolve_device(self.device, precision)
                self._state = ("flyt", (*self._load(device, precision, announce=False), device, precision))
        return self._state

    def _mixer(self):
        from flyt.jobs.score_mflyt import MixerScores

        return MixerScores(self.parquet_dir, *self.mixer)

    def run(self, unit: Unit, state) -> dict:
        [(_, result)] = list(self.run_many([unit], state))
        if isinstance(result, BaseException):
            raise result
        return result

    def run_many(self, units: list[Unit], state):
        mode, scorer = state
        if mode == "mflyt":
            from flyt.jobs.score_mflyt import score_shard

            for unit in units:
                try:
                    yield unit, score_shard(unit.payload, self.output, scorer, self.repeats.of(unit.name))
                except Exception as exc:  # an unreadable shard or score file: the others still get scored
                    yield unit, exc
            return
        from flyt.jobs.score_flyt import score_flyt

        model, spec, device, precision = scorer
        pairs = [(unit.payload, self.repeats.of(unit.name)) for unit in units]
        for index, result in score_flyt(pairs, self.output, model, spec, self.batch_size, self.workers, device,
                                        precision):
            yield units[index], result

    # ------------------------------------------------------------------------------------------ checks

    def check(self, here: bool = True) -> str:
        """Load the checkpoint once in this process, so that a bad one or a flag that does not fit it fails
        before any work starts; the mode it holds. ``here``: this process scores too and keeps what it
        loaded; else (Ray) a FLYT model is loaded on the CPU only to be checked. An M-FLYT mixer's weights
        join the job's settings, so its workers need neither torch nor the checkpoint."""
        from flyt.precision import parse_precision, resolve_device, resolve_precision

        parse_precision(self.precision)
        device, precision = "cpu", "fp32"
        if here:
            precision = resolve_precision(self.precision)
            device = resolve_device(self.device, precision)
        model, spec = self._load(device, precision, announce=True)
        self.mode = spec.mode
        if spec.mode == "mflyt":
            layer = model.layers[0]
            weight = layer.weight.detach().double().cpu().numpy().reshape(-1)
            bias = float(layer.bias.detach().double().cpu().reshape(-1)[0])
            self.mixer = (list(spec.parquet_fields), weight, bias)
            self._state = ("mflyt", self._mixer())  # the input-score files are checked here too
        elif here:
            self._state = ("flyt", (model, spec, device, precision))
        return self.mode

    def _load(self, device, precision: str, announce: bool):
        from flyt.models.checkpoint import load_scorer

        model, spec = load_scorer(self.checkpoint, self.model, self.parquet_fields, device=device,
                                  precision="bf16" if precision == "bf16" else "fp32")
        if spec.mode == "mflyt":
            if not self.parquet_dir:
                raise FlytError(f"{self.checkpoint} is an M-FLYT mixer over {', '.join(spec.parquet_fields)}: "
                                "give --parquet_dir with those input scores")
            given = list(self.parquet_fields or [])
            if given and set(given) != set(spec.parquet_fields):  # the same names in another order change nothing
                if len(given) != len(spec.parquet_fields):
                    raise FlytError(f"--parquet_fields names {len(given)} columns but the mixer mixes "
                                    f"{len(spec.parquet_fields)} ({', '.join(spec.parquet_fields)})")
                if announce:
                    print(f"flyt score: the mixer's inputs {', '.join(spec.parquet_fields)} are read from the columns "
                          f"{', '.join(given)} (--parquet_fields, in the mixer's order)", file=sys.stderr)
                spec.parquet_fields = given
        else:
            if self.parquet_dir or self.parquet_fields:
                raise FlytError(f"{self.checkpoint} is a FLYT image-text scorer: --parquet_dir/--parquet_fields are for M-FLYT")
            if self.model and spec.model != self.model:
                raise FlytError(f"{self.checkpoint} holds a scorer on {spec.model}, not --model {self.model}")
        return model, spec
