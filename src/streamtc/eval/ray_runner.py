"""Scale-out: videos sharded over Ray actors, one model (one `StreamingSession`) per actor.

    for record in run_on_ray(jobs, spec, protocol, settings, address="local", actors=2):
        writer.write(record)

Each actor builds the model once and runs `streaming.run_video` on one video at a time; the driver
hands the next video to whichever actor is free (a shared queue, so long and short videos balance)
and receives each answer record as soon as the actor yields it (Ray streaming generators), so the
driver writes answers as they are answered, as in a single-process run. A video always runs whole
on one actor, and every video starts from `session.reset()`, so the records equal the
single-process run's (timings aside; on CPUs, actors run their own number of torch threads, so
logits can differ in the last bits).

Placement: where the cluster has GPUs, each actor takes one (`num_gpus=1`) and runs on "cuda";
otherwise each actor takes `cpus_per_actor` CPUs and as many torch threads.

address: "local" starts a private cluster listening on 127.0.0.1 only, anything else joins one
(`streamtc.ray_cluster`, shared with `serve --ray`). Ray is an optional dependency: `pip install
'streamtc[ray]'`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

from ..checks import positive_int
from ..factory import SessionSpec
from ..ray_cluster import LOCAL, ray_connection
from .benchmarks.base import Protocol
from .datasets import VideoTask
from .results import Key
from .streaming import EvalSettings, run_video

logger = logging.getLogger(__name__)


class EvalActor:
    """Holds one session (one model) and answers whole videos with it (made a Ray actor class by
    `run_on_ray`)."""

    def __init__(self, spec: SessionSpec, device: str, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.session = spec.build(device)

    def run_video(self, task: VideoTask, pending: set[Key], protocol: Protocol,
                  settings: EvalSettings) -> Iterator[dict[str, Any]]:
        yield from run_video(self.session, task, protocol, settings, pending)


def run_on_ray(
    jobs: list[tuple[VideoTask, set[Key]]],
    spec: SessionSpec,
    protocol: Protocol,
    settings: EvalSettings,
    *,
    address: str = LOCAL,
    actors: int | None = None,
    cpus_per_actor: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the records of `jobs` (video, keys to answer) computed on Ray actors, as they arrive.

    actors: number of actors (default: one per GPU; without GPUs, one per `cpus_per_actor` CPUs,
    at least one). cpus_per_actor: CPUs (and torch threads) per CPU actor (default: the cluster's
    CPUs divided by the actors, at least 1).
    """
    positive_int(actors, "actors", optional=True)
    local_cpus = max(os.cpu_count() or 1, actors or 1)
    with ray_connection(address, local_cpus) as ray:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus:
            count = actors or gpus
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            device, threads = "cuda", None
        else:
            per_actor = cpus_per_actor or max(1, cpus // actors if actors else min(4, cpus))
            count = actors or max(1, cpus // per_actor)
            options, device, threads = {"num_cpus": per_actor}, "cpu", per_actor
        count = min(count, len(jobs))
        if gpus and count > gpus:
            logger.warning("%d actors for %d GPUs: the extra actors wait for a free GPU", count, gpus)
        logger.info("Ray: %d actor(s) on %s (%s)", count, device, options)
        actor_class = ray.remote(**options)(EvalActor)
        handles = [actor_class.remote(spec, device, threads) for _ in range(count)]
        work: queue.Queue[tuple[VideoTask, set[Key]]] = queue.Queue()
        for job in jobs:
            work.put(job)
        out: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        def drive(handle: Any) -> None:
            try:
                while not stop.is_set():
                    try:
                        task, pending = work.get_nowait()
                    except queue.Empty:
                        break
                    stream = handle.run_video.options(num_returns="streaming").remote(task, pending, protocol, settings)
                    for ref in stream:
                        out.put(("record", ray.get(ref)))
                        if stop.is_set():
                            break
            except BaseException as error:  # handed to the driver thread, which re-raises it
                out.put(("error", error))
            finally:
                out.put(("done", None))

        threads_ = [threading.Thread(target=drive, args=(h,), daemon=True) for h in handles]
        for thread in threads_:
            thread.start()
        running = len(threads_)
        try:
            while running:
                kind, value = out.get()
                if kind == "done":
                    running -= 1
                elif kind == "error":
                    raise value
                else:
                    yield value
        finally:
            stop.set()
            for handle in handles:
                ray.kill(handle)
            for thread in threads_:
                thread.join(timeout=10)


__all__ = ["EvalActor", "run_on_ray"]
