"""Where a training's activation batches come from: cached Arrow shards, or the LM itself.

Both sources hand each worker the same thing: batches `{hook: [B, d_model]}` of exactly B rows,
the same tokens at every hook, for `passes` passes over the worker's share of the data. The
data is cut into chunks of a shard's worth of sequences (`cache.shard_tokens`) and chunk c goes
to worker c mod world, in both sources alike:

- `cached`: a chunk is one shard of every hook (written by `raysae cache` from one forward
  pass), read back and checked token by token across hooks;
- `streamed`: a chunk is the same sequences read from the corpus and run through the LM's
  truncated forward on the worker (stopping above the deepest hook), nothing written to disk.

With `shuffle`, cached chunks come in a seeded random order per pass and the rows of a buffer of
`buffer_chunks` chunks are permuted (streamed chunks come in corpus order, rows permuted alike);
without, both give the rows in corpus order, so the same tokens give the same batches in both
modes. Rows left over at the end of a buffer (fewer than B) open the next batch; at the end of
the last pass they are dropped. A second pass is logged; a budget that needs more rows than the
passes give runs out, and the training loop names both numbers.

What a stream can give is known before it runs: `check_stream` refuses a budget beyond it (the
driver's `Fit.check`, from the cached data), and `check_budgets` the same from the config alone
(`raysae check`, before any work).

Resuming at batch s costs no recomputation of what was consumed before: a chunk's row count is
known without loading it (the manifest, or the special-token mask of its token ids), so whole
buffers before s are only counted, and only the buffer holding batch s is loaded again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from raysae.config import ConfigError, JobConfig
from raysae.models import run_with_cache
from raysae.shards import ActivationReader, ShardError, ShardInfo

log = logging.getLogger("raysae.sources")

Batch = dict[str, Tensor]
"""Hook name -> [B, d_model] activations of the same B tokens."""


class Chunk(NamedTuple):
    """A shard's worth of tokens: how many rows it gives, and how to get them."""

    rows: int
    load: Callable[[], Batch]


@dataclass(frozen=True)
class StreamSettings:
    """How one worker reads its share."""

    batch_size: int
    """Rows per batch on this worker (the global batch divided by the world size)."""
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle: bool = True
    passes: int = 1
    """Passes over the data; more than one is logged as it starts."""
    buffer_chunks: int = 4
    """Chunks whose rows are permuted together (shuffle)."""
    skip_batches: int = 0
    """Batches already consumed (a resumed run): counted, not loaded."""


def batches_from_chunks(
    chunks_of_pass: Callable[[int, torch.Generator], Iterator[Chunk]], s: StreamSettings
) -> Iterator[Batch]:
    """Exactly-B-row batches over `s.passes` passes of the chunks; see the module docstring."""
    gen = torch.Generator().manual_seed(s.seed)
    B = s.batch_size
    carry: Batch | None = None
    carry_rows = 0
    emitted = 0
    for p in range(s.passes):
        if p:
            log.info("worker %d: pass %d of %d over its data", s.rank, p + 1, s.passes)
        chunks = chunks_of_pass(p, gen)
        while buffer := list(islice(chunks, s.buffer_chunks)):
            new_rows = sum(c.rows for c in buffer)
            perm = torch.randperm(new_rows, generator=gen) if s.shuffle else None
            n = carry_rows + new_rows
            end = emitted + n // B
            rest = n % B
            # Load only when a batch of this buffer, or the carry into the next, is wanted: the
            # carry always opens the very next batch.
            if end > s.skip_batches or (end == s.skip_batches and rest):
                x = _join(carry, carry_rows, [c.load() for c in buffer])
                # the carry first (as it was), then the new rows, permuted when shuffling;
                # gathered batch by batch, so the buffer is never copied whole
                order = torch.arange(n) if perm is None else torch.cat(
                    [torch.arange(carry_rows), carry_rows + perm])
                for start in range(0, n - rest, B):
                    if emitted >= s.skip_batches:
                        idx = order[start : start + B]
                        yield {h: v[idx.to(v.device)].float() for h, v in x.items()}
                    emitted += 1
                idx = order[n - rest :]
                carry = {h: v[idx.to(v.device)] for h, v in x.items()}
            else:
                emitted, carry = end, None
            carry_rows = rest


def _join(carry: Batch | None, carry_rows: int, loaded: list[Batch]) -> Batch:
    """The carry, then the new rows, per hook. A carry that was only counted (never loaded) is
    zeros: it lies wholly in a batch that is skipped."""
    out = {}
    for hook in loaded[0]:
        parts = [x[hook] for x in loaded]
        if carry is not None:
            parts.insert(0, carry[hook])
        elif carry_rows:
            parts.insert(0, parts[0].new_zeros(carry_rows, parts[0].shape[1]))
        out[hook] = torch.cat(parts)
    return out


# ---------------------------------------------------------------------------------------------
# Cached: one shard of every hook per chunk


def cached_chunks(readers: dict[str, ActivationReader], rank: int, world: int,
                  shuffle: bool) -> Callable[[int, torch.Generator], Iterator[Chunk]]:
    """This worker's shards (shard i to worker i mod world) of every hook, read together."""
    first = next(iter(readers.values()))
    files = [s.file for s in first.manifest.shards]
    infos = {}
    for hook, reader in readers.items():
        mine = {s.file: s for s in reader.manifest.shards}
        if [s.file for s in reader.manifest.shards] != files or any(
            mine[f].num_tokens != s.num_tokens for f, s in zip(files, first.manifest.shards)
        ):
            raise ShardError(
                f"{reader.directory} and {first.directory} do not hold the same tokens (shard "
                "files or row counts differ); cache both sites in one pass"
            )
        infos[hook] = mine
    own = files[rank::world]

    def load(file: str) -> Batch:
        tables = {h: r.read_shard(infos[h][file]) for h, r in readers.items()}
        base = next(iter(tables.values()))
        for h, t in tables.items():
            for col in ("token_id", "seq_index", "position"):
                if not t.column(col).equals(base.column(col)):
                    raise ShardError(f"{readers[h].directory / file}: column {col} differs from "
                                     f"{first.directory / file}; the caches hold other tokens")
        return {h: readers[h].vectors(t) for h, t in tables.items()}  # float32 per batch

    def chunks(_pass: int, gen: torch.Generator) -> Iterator[Chunk]:
        order = own
        if shuffle:
            order = [own[i] for i in torch.randperm(len(own), generator=gen)]
        for f in order:
            yield Chunk(infos[next(iter(readers))][f].num_tokens, lambda f=f: load(f))

    return chunks


def cached_rows(readers: dict[str, ActivationReader], rank: int, world: int) -> int:
    """Rows one pass gives worker `rank` (from the manifest)."""
    shards: Sequence[ShardInfo] = next(iter(readers.values())).manifest.shards
    return sum(s.num_tokens for s in shards[rank::world])


# ---------------------------------------------------------------------------------------------
# Streamed: the LM's truncated forward on the worker, one chunk of sequences at a time


class LMActivations:
    """An LM on this worker's device turning token windows into activations at hook sites."""

    def __init__(self, model: torch.nn.Module, sites: Sequence[tuple[str, int]],
                 special_ids: Sequence[int], forward_batch: int, device: torch.device | str):
        self.model, self.sites = model, [tuple(s) for s in sites]
        self.special = torch.tensor(list(special_ids), dtype=torch.long)
        self.forward_batch, self.device = forward_batch, device

    def keep(self, ids_NT: Tensor) -> Tensor:
        """The positions whose activations are kept (special tokens dropped), flattened."""
        return ~torch.isin(ids_NT, self.special).reshape(-1)

    def __call__(self, ids_NT: Tensor) -> Batch:
        keep = self.keep(ids_NT).to(self.device)
        parts: dict[str, list[Tensor]] = {}
        for s in range(0, len(ids_NT), self.forward_batch):
            ids = ids_NT[s : s + self.forward_batch].to(self.device)
            for name, x in run_with_cache(self.model, ids, self.sites).items():
                parts.setdefault(name, []).append(x)  # the model's dtype; float32 per batch
        return {name: torch.cat(xs).reshape(keep.numel(), -1)[keep] for name, xs in parts.items()}


def streamed_chunks(lm: LMActivations, windows: Callable[[], Iterator[np.ndarray]],
                    chunk_seqs: int, rank: int, world: int
                    ) -> Callable[[int, torch.Generator], Iterator[Chunk]]:
    """Chunks of `chunk_seqs` windows from the corpus (chunk c to worker c mod world); every
    pass reads the corpus again and runs the forward again."""

    def chunks(_pass: int, _gen: torch.Generator) -> Iterator[Chunk]:
        it = windows()
        c = 0
        while block := list(islice(it, chunk_seqs)):
            if c % world == rank:
                ids = torch.from_numpy(np.stack(block)).long()
                yield Chunk(int(lm.keep(ids).sum()), lambda ids=ids: lm(ids))
            c += 1

    return chunks


# ---------------------------------------------------------------------------------------------
# What a stream can give, from the data alone or from the config alone


@dataclass(frozen=True)
class StreamSupply:
    """What a fit's data can give its workers, read from the data alone on the driver."""

    batch: tuple[str, int]
    """The setting that sizes a step's batch over every worker, and its value."""
    budget: tuple[str, int]
    """The setting that sizes the longest member's training, and its value in tokens."""
    data: str
    """What the stream reads, as the message names it (`cached data`, `cached pairs`)."""
    tokens: Callable[[], int]
    """Tokens the stream gives over every worker and pass (called once the batch splits)."""
    shards: tuple[str, int] | None = None
    """A shard folder and its shard count, where each worker needs shards of its own."""


def batched_tokens(per_worker: list[int], batch_size: int, passes: int) -> int:
    """Tokens in whole batches of `batch_size` over every worker and pass: each worker takes
    an equal share of every batch, so the one with the fewest rows ends the stream."""
    b = batch_size // len(per_worker)
    return len(per_worker) * b * min(passes * rows // b for rows in per_worker)


def check_stream(job: JobConfig, supply: StreamSupply) -> None:
    """Raise unless every worker gets an equal share of every batch, shards of its own, and
    the longest budget fits the stream without reading the data more often than asked."""
    world, passes = job.train.num_workers, job.train.data_passes
    setting, batch = supply.batch
    if batch % world:
        raise ConfigError(f"{setting}: {batch} is not divisible by train.num_workers ({world}); "
                         "each worker takes an equal share of every batch")
    if supply.shards is not None and supply.shards[1] < world:
        folder, n = supply.shards
        raise ConfigError(f"{folder}: {n} shards cannot feed {world} workers disjoint data; "
                         "lower cache.shard_tokens or train.num_workers")
    setting, budget = supply.budget
    have = supply.tokens()
    if budget > have:
        raise ConfigError(
            f"{setting}: a budget of {budget:,} tokens, but the {supply.data} gives {have:,} in "
            f"{passes} pass(es) over data.num_tokens ({job.data.num_tokens:,}); raise "
            f"data.num_tokens or set train.data_passes to {-(-budget * passes // max(have, 1))} "
            "to read it again (never done silently)"
        )


def window_tokens(job: JobConfig, world: int) -> list[int]:
    """Each worker's tokens of the data's windows (chunk c to worker c mod world), from the
    config alone: what the streamed source reads, and at least what a cache of them holds."""
    T = job.data.context_length
    windows = -(-job.data.num_tokens // T)
    chunk = chunk_seqs(job)
    chunks = [min(chunk, windows - c * chunk) for c in range(-(-windows // chunk))]
    return [sum(chunks[r::world]) * T for r in range(world)]


def check_budgets(job: JobConfig) -> None:
    """Before any work (`raysae check`): raise ConfigError on a budget that the data's windows
    cannot give in `train.data_passes` passes, a batch that does not split over the workers, or
    fewer shards than workers. The run checks the cached data itself again (`Fit.check`)."""
    t, world = job.train, job.train.num_workers
    budgets = [("train.num_tokens", t.num_tokens, "train.batch_size", t.batch_size)]
    if job.sweep is not None and job.sweep.finetune_budgets:
        budgets.append(("sweep.finetune_budgets", max(job.sweep.finetune_budgets),
                        "train.batch_size", t.batch_size))
    if job.stitch is not None:
        s = job.stitch
        if s.budgets:
            budgets.append(("stitch.budgets", max(s.budgets), "train.batch_size", t.batch_size))
        budgets.append(("stitch.num_tokens", s.num_tokens, "stitch.batch_size", s.batch_size))
    per_worker = window_tokens(job, world)
    chunks = -(-job.data.num_tokens // (job.data.context_length * chunk_seqs(job)))
    cached = t.source == "cached" or job.stitch is not None  # a stitch sweep caches both models
    for setting, budget, batch_setting, batch in budgets:
        check_stream(job, StreamSupply(
            batch=(batch_setting, batch), budget=(setting, budget), data="data",
            tokens=lambda batch=batch: batched_tokens(per_worker, batch, t.data_passes),
            shards=("the cache", chunks) if cached else None))


def chunk_seqs(job: JobConfig) -> int:
    """Sequences per chunk: a shard's worth, so both sources split the data alike."""
    return max(1, job.cache.shard_tokens // job.data.context_length)
