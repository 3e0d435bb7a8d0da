"""`build(..., engine="ray")`: decode and encode on a Ray cluster; scan, diff and commit stay in this process.

The driver (this process) walks and diffs exactly as a local build does; the files to encode become a Ray
Dataset. Decoding and preprocessing run as CPU tasks (`map_batches` with a function), encoding on a fixed
pool of actors (`ActorPoolStrategy(size=N)`, one GPU each, or CPU actors on a cluster without GPUs). The
embeddings stream back here, where `_Build` commits them in batches through the same code as a local build:
moves, duplicates, failures and the crash guarantees are the local build's.

Two Ray pitfalls shape the plan: actors that take every CPU starve the decode tasks and the dataset hangs
(so the pool leaves CPUs free), and an autoscaling pool ramps up slowly (so its size is fixed). A task or
actor that dies is retried by Ray; a block that still fails is dropped by Ray Data (`max_errored_blocks`)
and its files run again one per task, so a file that always kills its worker is recorded as failed.
Every path must be readable on every node (a shared file system).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import media
from ._ray_tasks import Encoder, decode_chunks
from .errors import RuclipSearchError
from .indexer import BuildReport, _Build, _Job, _Options, default_batch_size
from .loader import CHUNK, WORKER_DIED, FileMeta, Loaded, Loader, load_one
from .store import Store

INSTALL_HINT = "engine='ray' (--ray) needs Ray Data: pip install 'ruclip-search[ray]'"
# Ray Data retries a dead task or actor for ever by default: a file that kills its decoder every time would
# then stop the build. These bound the retries; a block that still fails is dropped and its files go again.
TASK_RETRIES = 2  # re-runs of a decode task whose worker died
ACTOR_RETRIES = 4  # restarts of a dead encoder actor, and retries of its batch
MAX_BLOCKS = 2000  # input blocks (each a ray.put on the driver); beyond, a block holds several decode tasks


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RuclipSearchError(f"{INSTALL_HINT} ({e}).") from e
    return ray


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """Ray, connected: the caller's connection if there is one, else `address` (None: a running cluster,
    else a new local one; "auto": a running cluster only; "local": a new local one; or host:port/ray://)."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RuclipSearchError(
            f"Cannot connect to a Ray cluster at {address or 'auto'!r} ({e}): start one with `ray start --head`, "
            "pass its address (--ray HOST:6379), or use --ray local for a cluster on this machine only."
        ) from e
    try:
        yield ray
    finally:
        ray.shutdown()


# -- on the driver ---------------------------------------------------------------------------------------
class _Spec:
    """What the driver needs of the model without loading its weights: dim and preprocessor."""

    def __init__(self, model: Any) -> None:
        if isinstance(model, (str, os.PathLike)):
            from .model import read_config
            from .preprocess import Preprocessor
            from .registry import resolve

            c = read_config(resolve(model))
            self.dim = int(c.embed_dim)
            self.preprocessor = Preprocessor(image_size=c.image_resolution, mean=tuple(c.mean), std=tuple(c.std),
                                             mode="fast")  # fmt: skip
        else:
            self.dim, self.preprocessor = int(model.dim), model.preprocessor


class _RayBuild(_Build):
    """`_Build` whose batches arrive embedded: the same dedup, failure and commit path as a local build."""

    def _load_model(self) -> Any:
        return _Spec(self.model_arg)

    def _encode(self, pixels: list[np.ndarray]) -> np.ndarray:
        return np.stack(pixels)  # embeddings, made by the actors


def _plan(ray: Any, device: str, actors: int | None) -> tuple[int, dict[str, Any], float, str, int]:
    """(pool size, actor resources, CPUs per decode task, actor device, torch threads per actor)."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), int(res.get("GPU", 0))
    if cpus <= 0:
        raise RuclipSearchError("The Ray cluster has no CPUs for decoding: add a node with CPUs.")
    task_cpus = 1.0 if cpus >= 2 else cpus / 2
    if gpus > 0 and not str(device).startswith("cpu"):
        n = actors or gpus
        actor_cpus = 1.0 if cpus >= n + task_cpus else max(0.1, (cpus - task_cpus) / n)
        return n, {"num_gpus": 1, "num_cpus": actor_cpus}, task_cpus, "cuda", 1
    if str(device).startswith("cuda"):
        raise RuclipSearchError(f"--device {device} but the Ray cluster has no GPUs: use --device cpu or auto.")
    actor_cpus = 1.0 if cpus >= 2 else cpus / 2
    room = int((cpus - task_cpus) // actor_cpus)  # leave CPUs for the decode tasks, or the dataset hangs
    n = max(1, min(actors or max(1, int(cpus) // 2), room))
    return n, {"num_cpus": actor_cpus}, task_cpus, "cpu", max(1, int(actor_cpus))


def chunk_size(batch: int, chunk: int) -> int:
    """Files per decode task: a divisor of the encoder's batch (at most `chunk`), so that whole decoded blocks
    fill each batch exactly; else a block of 9 rows with batches of 8 runs a batch of 1 (measured: a 1-image
    batch costs the CPU actor 0.3-0.8 s, about half a full batch)."""
    return batch if batch <= chunk else math.gcd(batch, chunk)


def _dataset(ray: Any, jobs: list[_Job], ids: list[int], spec: _Spec, model: Any, opts: _Options, batch: int,
             chunk: int, loader: Loader) -> Any:  # fmt: skip
    n, actor_args, task_cpus, device, threads = _plan(ray, opts.device, opts.ray_actors)
    per = chunk_size(batch, chunk)
    # one input row per decode task (a list of `per` files): Ray splits items, not files, between blocks
    items = [{"i": ids[k : k + per], "path": [jobs[i].path for i in ids[k : k + per]]}
             for k in range(0, len(ids), per)]  # fmt: skip
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    ds = ds.map_batches(decode_chunks, batch_size=1, batch_format="numpy", num_cpus=task_cpus,
                        max_retries=TASK_RETRIES,
                        fn_kwargs={"preprocessor": spec.preprocessor, "max_pixels": opts.max_pixels,
                                   "loader": loader})  # fmt: skip
    return ds.map_batches(
        Encoder, batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n),
        fn_constructor_kwargs={"model": model, "device": device, "threads": threads},
        max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES, **actor_args,
    )  # fmt: skip


class _TracebackAsText(logging.Filter):
    """Ray Data logs each failed block (we re-run its files) with exc_info: a handler that keeps records, as
    pytest's log capture does, then keeps the traceback's frames, whose executor state holds the finished
    dataset's actors alive with their CPUs, and the next dataset hangs for want of them (seen in
    test_ray_bad_files_and_dead_workers). The record keeps the traceback as text instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            import traceback

            record.exc_text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_info = None
        return True


@contextlib.contextmanager
def _no_frames_in_logs() -> Iterator[None]:
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    f = _TracebackAsText()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """Ray 2.60 deprecates passing max_retries/max_restarts to map_batches but names no replacement yet."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        yield


def _batches(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's output as it streams in; a failure of Ray itself (an actor that cannot start, a lost
    cluster) becomes a RuclipSearchError (what was committed is kept)."""
    from ray.exceptions import RayError

    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except RayError as e:
        first = str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__
        raise RuclipSearchError(
            f"The build on Ray failed ({type(e).__name__}: {first}); what was committed is kept: fix the "
            "cause (the Ray logs under /tmp/ray on the nodes say more) and run the same command again."
        ) from e


def _released(ray: Any, free: float, timeout: float = 60.0) -> None:
    """Wait (at most `timeout` s) until the cluster has the CPUs it had before the first pass: the finished
    dataset's actors are gone, so the next pass's decode tasks are not starved by them."""
    import gc
    import time

    gc.collect()
    t0 = time.monotonic()
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() - t0 < timeout:
        time.sleep(0.2)


def _meta(text: str) -> FileMeta | None:
    return FileMeta(**json.loads(text)) if text else None


def encode_on_ray(store: Store, report: BuildReport, model: Any, name: str, jobs: list[_Job], opts: _Options,
                  loader: Loader = load_one) -> list[_Job]:  # fmt: skip
    """Decode and encode `jobs` on Ray; commit the results here in batches, as `_run`'s local path does.

    Returns the videos, untouched, for the local path of the same build: a video is several sampled frames
    (a parent row and frame rows), which the local path's batches already handle. `loader` (default
    load_one) must be a module-level function importable on every node; tests pass one that misbehaves on
    purpose.
    """
    is_video = [media.kind_of(j.path) == media.VIDEO for j in jobs]  # as load_one decides (by name, else content)
    videos = [j for j, v in zip(jobs, is_video, strict=True) if v]
    jobs = [j for j, v in zip(jobs, is_video, strict=True) if not v]
    if not jobs:
        return videos
    batch_size = opts.batch_size if opts.batch_size is not None else default_batch_size(opts.device)
    b = _RayBuild(store, report, model, name, opts.device, batch_size, opts.progress)
    b.total = len(jobs)
    spec = b.model  # checks the index's dim against the model's before any work
    with connected(opts.ray_address) as ray, _no_frames_in_logs():
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
        ctx.max_errored_blocks, ctx.enable_progress_bars = -1, False  # a failed block: its files go again below
        model_ref = ray.put(model) if not isinstance(model, (str, os.PathLike)) else model
        try:
            todo = list(range(len(jobs)))
            free = ray.available_resources().get("CPU", 0)
            for chunk in (CHUNK, 1):  # the second pass runs what a dropped block held, one file per task
                if not todo:
                    break
                if chunk != CHUNK:
                    _released(ray, free)
                done = np.zeros(len(jobs), dtype=bool)
                with _quiet_deprecation():
                    ds = _dataset(ray, jobs, todo, spec, model_ref, opts, b.batch_size, chunk, loader)
                for out in _batches(ds):
                    fatal = next((f for f in out["fatal"] if f), None)
                    if fatal:
                        raise RuclipSearchError(f"The build on Ray stopped: {fatal} (what was committed is kept).")
                    for k, i in enumerate(out["i"].tolist()):
                        done[i] = True
                        digest = bytes.fromhex(out["digest"][k]) if out["digest"][k] else None
                        if out["ok"][k]:
                            result = Loaded(out["embedding"][k], digest, _meta(out["meta"][k]), None)
                        else:
                            result = Loaded(None, digest, None, out["error"][k] or "cannot decode")
                        b.add(jobs[i], result)
                todo = [i for i in todo if not done[i]]
                del ds  # its actors go: the next pass needs their CPUs (actors that hold every CPU hang it)
            for i in todo:  # a file whose task died on every try, alone: it kills its worker
                b.add(jobs[i], Loaded(None, None, None, WORKER_DIED))
            b.flush()
        finally:
            ctx.max_errored_blocks, ctx.enable_progress_bars = saved
    return videos
