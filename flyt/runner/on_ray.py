"""Running a job's units on a Ray cluster (or a Ray started here): the engine beyond one machine.

Each actor runs ``job.setup()`` once (a loaded model stays loaded), then ``job.units_per_call`` units a
call (one, or several for a job whose ``run_many`` pipelines them); units go to actors as they free up.
An actor that is lost (its process killed, its node gone) costs only the units of its call: each goes
back in the queue for a fresh actor, at most ``retries`` times, unless its outputs already exist (it
finished just before the loss), in which case it is not redone. A unit's own error is no loss: the
actor returns it and ``run_job`` records it, as with ``InProcess``.
"""

from __future__ import annotations

import math
import pickle
import socket
from collections import Counter, deque
from typing import Iterator

from flyt.errors import FlytError
from flyt.runner.job import Job, Unit, error_message

CONNECT_SECONDS = 5.0  # how long an address may take to answer before flyt gives up on it


def _ray():
    try:
        import ray
    except ImportError:
        raise FlytError("--engine ray needs Ray: pip install 'flyt[ray]'") from None
    return ray


def _probe(address: str) -> None:
    """Fail fast on an address where nothing listens: ``ray.init`` would retry it for minutes."""
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise FlytError(f"--ray_address {address}: expected HOST:PORT (e.g. head-node:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise FlytError(f"--ray_address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                        "with `ray start --head`, or leave --ray_address and RAY_ADDRESS unset for a local Ray") from None


class _Worker:
    """One Ray actor: the job's per-worker state, built on its first call, kept for the next ones."""

    def __init__(self, job: Job):
        self.job, self.state, self.ready = job, None, False

    def run(self, units: list[Unit]) -> list:
        """Each unit's statistics, or its exception *returned* (a raised one would look like a lost actor),
        in the order of ``units``; several units share one ``run_many`` (a job's pipeline)."""
        done, error = {}, RuntimeError("the job's run_many gave no result for this unit")
        try:
            if not self.ready:
                self.state, self.ready = self.job.setup(), True
            for unit, result in self.job.run_many(units, self.state):
                done[unit.name] = result
        except Exception as exc:  # a setup error (or a broken pipeline) fails the units it left
            error = exc
        return [_picklable(done.get(unit.name, error)) for unit in units]


def _picklable(result):
    if isinstance(result, BaseException):
        try:
            pickle.dumps(result)
        except Exception:
            return RuntimeError(error_message(result))
    return result


class RayExecutor:
    """Units on Ray actors sized by ``job.resources()``, as many as the cluster fits (at most ``max_actors``).

    ``address``: a running cluster (``HOST:PORT`` of its head, or ``ray://HOST:PORT``); None starts a
    Ray on this machine (``num_cpus``: its CPUs, default all; ``include_dashboard``: Ray's default).
    It connects when made, so that an address that does not answer fails before any work; a process
    already connected (``ray.init`` called) keeps its connection.
    """

    def __init__(self, address: str | None = None, max_actors: int | None = None, retries: int = 3,
                 num_cpus: int | None = None, include_dashboard: bool | None = None):
        if max_actors is not None and max_actors < 1:
            raise FlytError(f"the Ray executor needs max_actors >= 1 (got {max_actors})")
        self.address, self.max_actors, self.retries = address, max_actors, retries
        self.num_cpus, self.include_dashboard = num_cpus, include_dashboard
        self.connect()

    def connect(self):
        """The ``ray`` module, connected to the cluster (once per process)."""
        ray = _ray()
        if ray.is_initialized():
            return ray
        if self.address and self.address not in ("auto", "local"):
            _probe(self.address)
            ray.init(address=self.address)
        else:  # "local": a Ray of this machine's own, never another user's cluster found in /tmp/ray
            ray.init(address=self.address or "local", num_cpus=self.num_cpus, include_dashboard=self.include_dashboard)
        return ray

    def cluster_resources(self) -> dict:
        return self.connect().cluster_resources()

    def _actors_that_fit(self, ray, needs: dict, units: int) -> int:
        """How many actors of this size the cluster's nodes hold at once (node by node, not in total)."""
        asks = {"CPU": needs.get("num_cpus", 1), "GPU": needs.get("num_gpus", 0)}
        fits = 0
        for node in ray.nodes():
            if node.get("Alive"):
                have = node.get("Resources", {})
                fits += min((int(have.get(k, 0) // v) for k, v in asks.items() if v), default=units)
        if fits < 1:
            raise FlytError(f"no node of the Ray cluster has the {', '.join(f'{v} {k}' for k, v in asks.items() if v)} "
                            "one worker of this job needs (fewer --workers ask for fewer CPUs)")
        return min(fits, units, self.max_actors or math.inf)

    def run(self, job: Job, units: list[Unit]) -> Iterator[tuple[Unit, dict | BaseException]]:
        if not units:
            return
        ray = self.connect()
        from ray.exceptions import ActorUnschedulableError, ObjectLostError, RayActorError, WorkerCrashedError

        lost_errors = (RayActorError, WorkerCrashedError, ObjectLostError, ActorUnschedulableError)
        needs, per_call = job.resources(), max(1, job.units_per_call)
        actor_class = ray.remote(max_restarts=0, **needs)(_Worker)
        shared_job = ray.put(job)  # stored once in the object store, not once per actor
        fits = self._actors_that_fit(ray, needs, -(-len(units) // per_call))
        actors = [actor_class.remote(shared_job) for _ in range(fits)]
        idle, queue, running, losses = list(actors), deque(units), {}, Counter()
        try:
            while queue or running:
                while queue and idle:
                    batch, actor = [queue.popleft() for _ in range(min(per_call, len(queue)))], idle.pop()
                    running[actor.run.remote(batch)] = (batch, actor)
                [ref], _ = ray.wait(list(running), num_returns=1)
                batch, actor = running.pop(ref)
                try:
                    results = ray.get(ref)
                except lost_errors as exc:
                    ray.kill(actor)
                    fresh = actor_class.remote(shared_job)
                    actors.append(fresh)
                    idle.append(fresh)
                    for unit in reversed(batch):  # requeued in their order, at the front
                        losses[unit.name] += 1
                        if job.done(unit):  # it finished before its worker went: its outputs hold its results
                            yield unit, {}
                        elif losses[unit.name] > self.retries:
                            last = error_message(exc).split(". ")[0]  # Ray's first sentence; its logs say more
                            yield unit, FlytError(f"lost its Ray worker {losses[unit.name]} times (last: {last})")
                        else:
                            queue.appendleft(unit)
                    continue
                idle.append(actor)
                yield from zip(batch, results)
        finally:
            for actor in actors:
                ray.kill(actor)
