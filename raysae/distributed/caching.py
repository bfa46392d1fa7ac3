"""Ray Data activation caching: token sequences -> a pool of LM actors -> Arrow shards.

Each Ray Data batch is one shard's worth of sequences. An actor runs the truncated forward for
every requested site at once and writes the shards itself, returning only their manifest
records, so activations never travel through the object store. The driver writes the
manifests once every shard is on disk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import ActorPoolStrategy

from raysae import shards
from raysae.activations import (
    CacheStatus,
    ShardCacher,
    cache_status,
    heldout_tokens,
    job_tokens,
    keep_heldout,
    prepare_dirs,
    special_token_ids,
    write_manifests,
)
from raysae.config import JobConfig, ModelConfig, from_dict, to_dict
from raysae.models import load_tokenizer

log = logging.getLogger("raysae.caching")


class _LMActor:
    """A Ray Data actor holding one LM (on its GPU when one is assigned)."""

    def __init__(self, model: dict, threads: int, **kwargs: Any) -> None:
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.cacher = ShardCacher(from_dict(ModelConfig, model), device=device, **kwargs)

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        ids = batch.column("input_ids").combine_chunks()
        ids_NT = ids.values.to_numpy().reshape(len(batch), ids.type.list_size)
        records = self.cacher(batch.column("seq_index").to_numpy(), ids_NT)
        return {k: [r[k] for r in records] for k in records[0]}


def sequences_dataset(tokens_NT: np.ndarray, seqs_per_shard: int) -> ray.data.Dataset:
    """One Ray Data block per shard of (seq_index, input_ids) rows."""
    n, t = tokens_NT.shape
    ids = pa.FixedSizeListArray.from_arrays(pa.array(tokens_NT.reshape(-1)), t)
    table = pa.table({"seq_index": pa.array(np.arange(n, dtype=np.int64)), "input_ids": ids})
    return ray.data.from_arrow(
        [table.slice(s, seqs_per_shard) for s in range(0, n, seqs_per_shard)]
    )


def cache_activations(job: JobConfig) -> dict[str, Path]:
    """Cache every (site, layer) of the job; reuse complete shard sets. Returns hook -> dir."""
    status = cache_status(job)  # raises on bad layers before any Ray work
    if not status.missing:
        log.info("activation cache %s is complete; reusing it", status.fingerprint)
        heldout_tokens(job)  # kept by the run that cached; read here, once, if it was not
        return status.dirs
    cache, data = job.cache, job.data
    tokenizer = load_tokenizer(job.model, data)
    # the training windows and the held-out ones right after them, in one read of the corpus
    T = data.context_length
    n_train, n_eval = -(-data.num_tokens // T), -(-job.train.eval_tokens // T)
    try:
        windows_NT = job_tokens(job, (n_train + n_eval) * T)
    except ValueError as e:
        raise ValueError(f"{e}: data.num_tokens ({data.num_tokens:,}) to cache, then "
                         f"train.eval_tokens ({job.train.eval_tokens:,}) held out") from None
    tokens_NT = windows_NT[:n_train]
    keep_heldout(job, windows_NT[n_train:])
    seqs_per_shard = max(1, cache.shard_tokens // data.context_length)
    prepare_dirs(status)
    log.info(
        "caching %d sites x %d tokens into %d shards each under %s",
        len(status.missing),
        tokens_NT.size,
        -(-len(tokens_NT) // seqs_per_shard),
        next(iter(status.dirs.values())).parent,
    )
    t0 = time.perf_counter()
    with _shard_write_errors_unwrapped():
        records = _run_actors(job, status, tokens_NT, seqs_per_shard, tokenizer)
    write_manifests(job, status, records)
    dt = time.perf_counter() - t0
    log.info("cached %d tokens in %.1f s (%.0f tokens/s)", tokens_NT.size, dt, tokens_NT.size / dt)
    return status.dirs


def _run_actors(job: JobConfig, status: CacheStatus, tokens_NT: np.ndarray, seqs_per_shard: int,
                tokenizer: Any) -> list[dict[str, Any]]:
    """The LM actor pool over every shard's sequences; returns the shards' manifest records."""
    cache = job.cache
    return (
        sequences_dataset(tokens_NT, seqs_per_shard)
        .map_batches(
            _LMActor,
            batch_size=seqs_per_shard,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=cache.num_actors),
            num_cpus=cache.actor_cpus,
            num_gpus=1 if cache.use_gpu else 0,
            fn_constructor_kwargs=dict(
                model=to_dict(job.model),
                threads=max(1, round(cache.actor_cpus)),
                sites=list(status.missing),
                dirs={k: str(v) for k, v in status.dirs.items()},
                dtype=cache.dtype,
                batch_size=cache.batch_size,
                special_ids=special_token_ids(job.model, tokenizer) if cache.exclude_special else [],
            ),
        )
        .take_all()
    )


@contextlib.contextmanager
def _shard_write_errors_unwrapped() -> Iterator[None]:
    """An actor's failed shard write (a full disk) as the driver's own `ShardWriteError`, which
    names the file and its size, instead of Ray Data's UserCodeException around a remote
    traceback. The set's manifest is never written, so the next run computes it again. Ray Data
    keeps the actor's exception only when asked to (a UserCodeException loses its cause on the
    way to the driver), so the context asks for it while the pool runs."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    try:
        yield
    except Exception as e:
        seen, todo = set(), [e]
        while todo:
            err = todo.pop()
            if err is None or id(err) in seen:
                continue
            seen.add(id(err))
            # the actor's own error, not Ray's copy of it (a RayTaskError subclassing it)
            if isinstance(err, shards.ShardWriteError) and not isinstance(err, ray.exceptions.RayError):
                raise shards.ShardWriteError(err.errno, err.strerror) from None
            todo += [err.__cause__, err.__context__, getattr(err, "cause", None)]
        raise
    finally:
        ctx.raise_original_map_exception = before
