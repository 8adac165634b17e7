"""How items reach replicas: in this process, over torchrun ranks, or over a Ray actor pool.

Each engine gives the same three things to ``run_farm``: whether this process is the one that
plans and reports (``is_main``), ``share`` (the main process's plan, received by all), and
``run`` (render the items, return every row of this run on the main process).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .items import WorkItem, batches
from .job import FarmJob
from .manifest import ManifestRow, worker_name
from .render import Renderer

logger = logging.getLogger("diffaccel")
T = TypeVar("T")

RAY_CPU_SHARE = 0.5  # CPU actors ask for half a core: on 2 cores two actors at 1 CPU each deadlocked
RAY_MAX_RESTARTS = 2  # a replica whose process dies (OOM kill, lost node) is restarted ...
RAY_MAX_TASK_RETRIES = 2  # ... and the item it was rendering is sent again


class FarmError(RuntimeError):
    """The farm could not go on (a replica died beyond its retries); what finished is kept."""


@dataclass(frozen=True)
class EngineOptions:
    """``workers``: replicas (ray; default one per ``devices_per_replica`` GPUs, 1 on CPU), the world
    size (torchrun; taken from the launcher), 1 (local). ``device``: the torch device (local, torchrun)."""

    workers: int | None = None
    devices_per_replica: int = 1
    device: str | None = None
    retries: int = 1
    progress: bool = True
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}.")
        if self.devices_per_replica < 1:
            raise ValueError(f"--devices-per-replica must be >= 1, got {self.devices_per_replica}.")
        if self.retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.retries}.")


def _no_gpu_error(k: int, where: str) -> ValueError:
    return ValueError(
        f"--devices-per-replica {k} spreads one pipeline over {k} GPUs, but {where} has none. On CPU a "
        f"replica is one process: ask for more replicas instead (--workers with --engine ray, "
        f"--nproc_per_node with torchrun)."
    )


def cuda_block(k: int, replica: int) -> tuple[int, ...]:
    """The CUDA devices of replica number ``replica`` on this node: ``k`` consecutive ones (none for k=1)."""
    import torch

    if k == 1:
        return ()
    if not torch.cuda.is_available():
        raise _no_gpu_error(k, "this machine")
    devices = tuple(range(replica * k, replica * k + k))
    if devices[-1] >= torch.cuda.device_count():
        raise ValueError(f"Replica {replica} with --devices-per-replica {k} needs CUDA devices {list(devices)}; "
                         f"this node has {torch.cuda.device_count()}.")
    return devices


def render_all(renderer: Renderer, items: Sequence[WorkItem], progress: bool, desc: str) -> list[ManifestRow]:
    """Every item, ``job.batch_size`` to a pipeline call where they share their call arguments."""
    from tqdm.auto import tqdm

    rows: list[ManifestRow] = []
    with tqdm(total=len(items), disable=not progress, desc=desc, unit="item") as bar:
        for batch in batches(items, renderer.job.batch_size):
            rows.extend(renderer.render_batch(batch))
            bar.update(len(batch))
            bar.set_postfix(failed=sum(r.status == "failed" for r in rows))
    return rows


class LocalEngine:
    """One replica in this process (tests, laptops, one GPU); can reuse a pipeline already loaded."""

    name = "local"
    is_main = True

    def __init__(self, options: EngineOptions) -> None:
        if options.workers not in (None, 1):
            raise ValueError(f"--engine local runs one worker in this process, not {options.workers}; for more use "
                             f"--engine ray, or torchrun --nproc_per_node=N ... --engine torchrun.")
        self.options = options
        self.devices = cuda_block(options.devices_per_replica, 0)

    def share(self, make: Callable[[], T]) -> T:
        return make()

    def run(self, job: FarmJob, todo: Sequence[WorkItem], out: Path, pipe: Any = None) -> list[ManifestRow]:
        if not todo:
            return []
        renderer = Renderer(job, out, worker_name(self.name, 0), self.options.device, self.devices, pipe,
                            self.options.retries)
        try:
            return render_all(renderer, todo, self.options.progress, "farm")
        finally:
            renderer.close()

    def close(self) -> None:
        pass


class TorchrunEngine:
    """One replica per process launched by torchrun (or ``accelerate launch``, or srun with torchrun's
    variables); accelerate's ``split_between_processes`` hands each rank its share of the items."""

    name = "torchrun"

    def __init__(self, options: EngineOptions) -> None:
        import torch
        from accelerate import PartialState

        # On CPU PartialState needs cpu=True, or it sets up no process group and every rank does every item.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        if options.workers is not None and options.workers != self.state.num_processes:
            raise ValueError(f"--workers {options.workers} does not match the {self.state.num_processes} process(es) "
                             f"torchrun started; drop --workers (the launcher decides) or change --nproc_per_node.")
        if self.state.num_processes == 1:
            logger.info("diffaccel farm: --engine torchrun in a single process (not launched by torchrun)")
        self.options = options
        self.is_main = self.state.is_main_process
        self.devices = cuda_block(options.devices_per_replica, self.state.local_process_index)

    def share(self, make: Callable[[], T]) -> T:
        from accelerate.utils import broadcast_object_list

        box = [make() if self.is_main else None]
        broadcast_object_list(box)
        return box[0]

    def run(self, job: FarmJob, todo: Sequence[WorkItem], out: Path, pipe: Any = None) -> list[ManifestRow] | None:
        from accelerate.utils import gather_object

        state = self.state
        with state.split_between_processes(list(todo)) as mine:
            rows: list[ManifestRow] = []
            if mine:
                device = self.options.device or (None if self.devices else str(state.device))
                renderer = Renderer(job, out, worker_name("rank", state.process_index), device, self.devices, pipe,
                                    self.options.retries)
                try:
                    desc = f"farm rank {state.process_index}/{state.num_processes}"
                    rows = render_all(renderer, mine, self.options.progress and self.is_main, desc)
                finally:
                    renderer.close()
        everything = gather_object(rows) if state.num_processes > 1 else rows
        return list(everything) if self.is_main else None

    def close(self) -> None:
        destroy = getattr(self.state, "destroy_process_group", None)
        if destroy is not None and self.state.num_processes > 1:
            destroy()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'diffaccel[farm]' (or pip install 'ray>=2.9'); "
                         "without it use --engine torchrun or --engine local.") from None
    return ray


class Replica:
    """A Ray actor: one accelerated pipeline (on its GPUs, or on CPU) rendering the items sent to it."""

    def __init__(self, job: FarmJob, out: str, index: int, devices_per_replica: int, retries: int,
                 replicas: int) -> None:
        import os

        import torch

        cuda = torch.cuda.is_available()  # Ray makes exactly this actor's GPUs visible
        if not cuda:  # Ray sets one thread per fractional-CPU actor; share this node's cores instead
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // replicas))
        devices = tuple(range(devices_per_replica)) if cuda and devices_per_replica > 1 else ()
        self.renderer = Renderer(job, out, worker_name("ray", index), "cuda" if cuda else "cpu", devices,
                                 retries=retries)

    def render_batch(self, items: list[WorkItem]) -> list[ManifestRow]:
        return self.renderer.render_batch(items)


class RayEngine:
    """A Ray actor pool, one replica per actor, items streamed to whichever replica is free; works on
    a local Ray started here or on a cluster (``ray start --head`` / ``--address``)."""

    name = "ray"
    is_main = True

    def __init__(self, options: EngineOptions) -> None:
        ray = import_ray()
        self.ray, self.options = ray, options
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=options.ray_address, include_dashboard=False)
        try:
            self.workers, self.resources = self._placement(ray.cluster_resources())
        except BaseException:
            self.close()
            raise

    def _placement(self, cluster: dict) -> tuple[int, dict]:
        k, gpus, cpus = self.options.devices_per_replica, int(cluster.get("GPU", 0)), cluster.get("CPU", 0)
        if gpus:
            workers = self.options.workers or gpus // k
            if workers < 1 or workers * k > gpus:
                raise ValueError(f"{self.options.workers or 1} replica(s) x --devices-per-replica {k} need "
                                 f"{max(workers, 1) * k} GPUs; the Ray cluster has {gpus}.")
            return workers, {"num_gpus": k, "num_cpus": 1}
        if k > 1:
            raise _no_gpu_error(k, "the Ray cluster")
        workers = self.options.workers or 1
        if workers * RAY_CPU_SHARE > cpus:
            raise ValueError(f"{workers} CPU replicas at {RAY_CPU_SHARE} CPU each need {workers * RAY_CPU_SHARE:g} "
                             f"CPUs; the Ray cluster has {cpus:g}.")
        return workers, {"num_cpus": RAY_CPU_SHARE}

    def share(self, make: Callable[[], T]) -> T:
        return make()

    def run(self, job: FarmJob, todo: Sequence[WorkItem], out: Path, pipe: Any = None) -> list[ManifestRow]:
        from ray.util import ActorPool
        from tqdm.auto import tqdm

        ray = self.ray
        if pipe is not None:
            raise ValueError("--engine ray loads a pipeline in every replica; pipe= applies to the local engine.")
        if not todo:
            return []
        remote = ray.remote(max_restarts=RAY_MAX_RESTARTS, max_task_retries=RAY_MAX_TASK_RETRIES)(Replica)
        calls = batches(todo, job.batch_size)
        replicas = min(self.workers, len(calls))
        actors = [remote.options(**self.resources).remote(job, str(out), i, self.options.devices_per_replica,
                                                          self.options.retries, replicas)
                  for i in range(replicas)]
        rows: list[ManifestRow] = []
        try:
            results = ActorPool(actors).map_unordered(lambda actor, batch: actor.render_batch.remote(batch), calls)
            with tqdm(total=len(todo), disable=not self.options.progress, desc="farm (ray)", unit="item") as bar:
                for batch_rows in results:
                    rows.extend(batch_rows)
                    bar.update(len(batch_rows))
                    bar.set_postfix(failed=sum(r.status == "failed" for r in rows))
        except ray.exceptions.RayError as error:
            raise FarmError(f"a Ray replica failed beyond its {RAY_MAX_RESTARTS} restarts ({type(error).__name__}: "
                            f"{error}); {len(rows)} item(s) of this run are in the manifest, rerun the same "
                            f"command to continue.") from error
        finally:
            for actor in actors:
                ray.kill(actor)
        return rows

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


ENGINES = {"local": LocalEngine, "torchrun": TorchrunEngine, "ray": RayEngine}


def make_engine(name: str, options: EngineOptions):
    try:
        engine = ENGINES[name]
    except KeyError:
        raise ValueError(f"Unknown farm engine {name!r}; choose from {list(ENGINES)}.") from None
    return engine(options)
