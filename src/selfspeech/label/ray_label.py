"""Teacher labelling at scale on Ray Data: the plain path's batches, decoded by stateful actors.

The driver plans exactly the batches ``label_manifest`` would decode
(``plan_batches``: same chunking, same duration sort, same batch size, the
utterances already in the output skipped), so the texts are the same whatever
the number of actors: a batch's padding, hence Whisper's window, does not
depend on who decodes it. Identical means under the same threading: a Ray
actor with 1 CPU runs with OMP_NUM_THREADS=1, and CTranslate2's int8 kernels
(hence an occasional transcript) change with the OpenMP thread count, so
compare with ``OMP_NUM_THREADS=1 selfspeech label --threads 1``. Each Ray row is one batch; ``map_batches`` runs it
through :class:`TeacherActor`, which loads the teacher once per actor. The
driver appends the records as they come back, with fsync, so a killed run
resumes where it stopped (``recover_done_ids``), as the plain path does.

Use it on one machine (``ray.init(num_cpus=N)``, the default here) or on a
cluster (``RAY_ADDRESS=...``: ``ray.init()`` joins it). ``ray`` is an optional
extra, imported only here. On CUDA (:func:`plan_actors`) each actor holds one
whole GPU, so there is one actor per GPU; Ray picks the GPUs and shows each
actor only its own, which the actor's teacher then sees as ``cuda:0``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from selfspeech.accel import DeviceError
from selfspeech.label.filters import FilterConfig
from selfspeech.label.run import LabelStats, label_batch, plan_batches, recover_done_ids, write_records
from selfspeech.label.teacher import DecodeOptions, resolve_compute_type


@dataclass(frozen=True)
class TeacherSpec:
    """What an actor needs to build its own teacher (models are not shipped between processes)."""

    name: str
    backend: str = "faster-whisper"
    compute_type: str = "auto"
    cpu_threads: int = 1
    options: dict = field(default_factory=dict)   # DecodeOptions fields
    device: str = "cpu"

    def load(self):
        from selfspeech.label.teacher import load_teacher

        return load_teacher(self.name, self.backend, self.compute_type, DecodeOptions(**self.options),
                            cpu_threads=self.cpu_threads, device=self.device)


@dataclass(frozen=True)
class ActorPlan:
    """How many teacher actors Ray runs, the resources each one asks for, and its teacher's device."""

    actors: int
    num_cpus: int
    num_gpus: int
    device: str


def plan_actors(device: str | torch.device, requested: int, cpu_threads: int, gpus: int) -> ActorPlan:
    """``requested`` CPU actors of ``cpu_threads`` CPUs each; on CUDA one actor per GPU.

    On CUDA each actor asks for ``num_gpus=1`` (a teacher per GPU: a Whisper
    decoder does not share a GPU usefully), so at most ``gpus`` actors run
    (``requested`` caps them; 0 takes every GPU). Ray sets the actor's
    CUDA_VISIBLE_DEVICES to its GPU, hence device ``cuda:0`` inside it,
    whichever ``cuda:N`` was asked for on the driver.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if gpus < 1:
            raise DeviceError(f"--device {device} with --ray: the Ray cluster has no GPU; use --device cpu, "
                              "or join a cluster with GPUs (RAY_ADDRESS)")
        return ActorPlan(min(requested, gpus) if requested > 0 else gpus, cpu_threads, 1, "cuda:0")
    if requested < 1:
        raise ValueError(f"--ray {requested}: give the number of CPU actors (1 or more)")
    return ActorPlan(requested, cpu_threads, 0, "cpu")


def _start_ray(ray, spec: TeacherSpec, concurrency: int) -> ActorPlan:
    """Join ``RAY_ADDRESS`` or start a local Ray sized for the actors; the plan for the cluster's GPUs."""
    cuda = torch.device(spec.device).type == "cuda"
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            local = plan_actors(spec.device, concurrency, spec.cpu_threads, torch.cuda.device_count() if cuda else 0)
            ray.init(num_cpus=local.actors * local.num_cpus, num_gpus=local.actors * local.num_gpus,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    gpus = int(ray.cluster_resources().get("GPU", 0)) if cuda else 0
    return plan_actors(spec.device, concurrency, spec.cpu_threads, gpus)


class TeacherActor:
    """Ray actor: one teacher per process, reused for every batch it receives."""

    def __init__(self, spec: dict, filters: dict):
        self.spec = TeacherSpec(**spec)
        self.teacher = self.spec.load()
        self.filters = FilterConfig(**filters)

    def __call__(self, rows: dict) -> dict:
        out = []
        for raw in rows["batch"]:
            recs = label_batch(self.teacher, self.spec.name, json.loads(raw), self.filters)
            out.append(json.dumps(recs, ensure_ascii=False))
        return {"records": out}


def label_with_ray(in_path: str | os.PathLike, out_path: str | os.PathLike, spec: TeacherSpec,
                   batch_size: int = 8, concurrency: int = 2, filters: FilterConfig = FilterConfig(),
                   limit: int | None = None, progress: bool = True) -> LabelStats:
    """Label ``in_path`` into ``out_path`` with ``concurrency`` Ray actors (on CUDA: one per GPU, at most
    ``concurrency``); same records as the plain path on the same device."""
    try:
        import ray
    except ImportError:
        raise ImportError("Ray labelling needs ray: pip install 'selfspeech[ray]'") from None
    from tqdm import tqdm

    in_path, out_path = Path(in_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = recover_done_ids(out_path)
    stats = LabelStats(device=torch.device(spec.device).type,
                       compute_type=resolve_compute_type(spec.compute_type, torch.device(spec.device), spec.backend))
    planned = list(plan_batches(in_path, done, batch_size, stats, limit))
    batches = [json.dumps(b, ensure_ascii=False) for b in planned]
    t_start = time.perf_counter()
    if batches:
        plan = _start_ray(ray, spec, concurrency)
        actor_spec = asdict(replace(spec, device=plan.device))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours below counts utterances
        ds = ray.data.from_items([{"batch": b} for b in batches], override_num_blocks=len(batches))
        res = ds.map_batches(TeacherActor, fn_constructor_kwargs={"spec": actor_spec, "filters": asdict(filters)},
                             batch_size=1, compute=ray.data.ActorPoolStrategy(size=plan.actors),
                             num_cpus=plan.num_cpus, **({"num_gpus": plan.num_gpus} if plan.num_gpus else {}))
        bar = tqdm(total=sum(len(b) for b in planned), desc=f"label {spec.name} (ray x{plan.actors})",
                   unit="utt", disable=not progress, dynamic_ncols=True)
        with open(out_path, "a", encoding="utf-8") as out:
            for row in res.iter_rows():
                recs = json.loads(row["records"])
                write_records(out, recs, stats)
                bar.update(len(recs))
        bar.close()
    stats.wall_seconds = time.perf_counter() - t_start
    return stats
