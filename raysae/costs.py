"""What a job costs before it runs: tokens, FLOPs, bytes on disk, memory per worker and wall
time per phase, the activation source `auto` picks, and how SAEs are packed into groups.

Pure arithmetic on the config and the model's shape (no weights are loaded), plus an optional
calibration (`Calibration`: measured forward, SAE-step and disk-read throughputs) that turns
FLOPs and bytes into seconds. `raysae plan CONFIG` prints it; every sweep prints it at its start
and logs it on its parent run.

The estimates, per token (d = d_model, F = d_sae, L = the blocks run up to the deepest site):
- LM forward: 2 x the parameters of the blocks run (12 d^2 per block: attention 4 d^2, MLP
  8 d^2) plus the embedding lookup, i.e. 24 d^2 L FLOPs (the unembedding is never run);
- one SAE training step: what its architecture's spec says (`raysae.architectures`): 10 d F
  FLOPs for relu/jumprelu (encoder, decoder and their three gradients), 2 d F + 10 d k for
  topk, batchtopk and matryoshka_batchtopk (the dense encoder, a sparse decode and backward;
  AuxK adds 4 d (d/2));
- shards: d x bytes per value (float32 4, float16/bfloat16 2) per cached site;
- training memory per SAE: weights, gradients and Adam's two moments (16 bytes per parameter)
  plus the batch's latents (3 B F x 4 bytes);
- the store (`StoreCost`): every group commit keeps each member's training state (float32
  weights and Adam's two moments, 12 bytes per parameter; Ray Train keeps every commit), every
  checkpoint and the end write the member's SAE folder (4 bytes per parameter), and a cached
  source reads each group's sites back from the shards.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from raysae.config import JobConfig, ModelConfig, SAEConfig
from raysae.models import model_dims, parse_hook_name

GiB = 1 << 30
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DISK_MARGIN = 0.9
"""A cache may use at most this share of the free space of its filesystem."""
FIT_STARTUP_S = 20.0
"""Ray Train's fixed cost per fit (worker group start, health checks; RAY_NOTES: 15-20 s)."""


def lm_flops_per_token(d_model: int, blocks: int) -> float:
    """Forward FLOPs per token of a decoder truncated after `blocks` blocks."""
    return 24.0 * d_model * d_model * blocks


def sae_step_flops_per_token(sae: SAEConfig, d_in: int) -> float:
    """Training FLOPs per token of one SAE step (forward and backward), as its architecture's
    spec prices it: five products of d_in x d_sae per token, dense for relu and jumprelu
    (10·d·F; torch's FlopCounterMode counts 10.1 and 10.0 on raysae's steps), and for the k
    architectures the dense encoder forward plus five sparse ones over the k active latents
    (2·d·F + 10·d·k; measured ~2·d·F + 10.5·d·k)."""
    return sae.spec.step_flops_per_token(sae, d_in, sae.width(d_in))


def sae_memory_bytes(sae: SAEConfig, d_in: int, batch_rows: int) -> int:
    """Training memory of one SAE on one worker: parameters with their gradients and Adam
    moments, the batch's latents, the dead-latent counter."""
    F = sae.width(d_in)
    params = sae.spec.parameters(d_in, F)
    return 16 * params + 12 * batch_rows * F + 8 * F


def stream_memory_bytes(job: JobConfig, hooks: int, streamed: bool, lm_params: int,
                        d_model: int) -> int:
    """Memory of a worker's stream: the shuffle buffer (4 chunks of every hook, in the cache's
    dtype or the model's) and, streamed, the LM's weights."""
    dtype = job.model.dtype if streamed else job.cache.dtype
    buffer = 4 * job.cache.shard_tokens * d_model * hooks * BYTES[dtype]
    return buffer + (BYTES[job.model.dtype] * lm_params if streamed else 0)


class Packing(NamedTuple):
    stream_bytes: int
    """Memory of the stream every group of this model carries."""
    sae_bytes: list[int]
    """Training memory of each SAE."""
    groups: list[list[int]]
    """The groups, as indices of the SAEs."""


def pack_saes(job: JobConfig, model: ModelConfig, saes: Sequence[tuple[SAEConfig, str]],
              streamed: bool) -> Packing:
    """SAEs (config, hook) of one model packed in order into the groups the sweeps train, each
    fitting `train.worker_memory_gb` with its stream and at most `train.max_group_saes`."""
    blocks, d = model_dims(model)
    rows = job.train.batch_size // job.train.num_workers
    sizes = [sae_memory_bytes(sae, d, rows) for sae, _ in saes]
    hooks = len({hook for _, hook in saes})
    overhead = stream_memory_bytes(job, hooks, streamed, 12 * d * d * blocks, d)
    capacity = int(job.train.worker_memory_gb * GiB) - overhead
    return Packing(overhead, sizes, pack(sizes, capacity, job.train.max_group_saes))


def pack(sizes: Sequence[int], capacity: int, max_count: int = 0) -> list[list[int]]:
    """Indices of `sizes` packed in order into groups of total size <= capacity (and at most
    max_count items when > 0); an item larger than capacity gets a group of its own."""
    groups: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        full = max_count and groups and len(groups[-1]) >= max_count
        if not groups or full or used + size > capacity:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


@dataclass(frozen=True)
class Calibration:
    """Measured throughputs that turn FLOPs and bytes into seconds."""

    forward_tokens_per_s: float
    """Truncated LM forward, on one worker."""
    sae_tokens_per_s: float
    """One SAE training step of the job's shape, on one worker."""
    read_bytes_per_s: float
    """Sequential reads from runs_dir."""


STATE_BYTES_PER_PARAM = 12
"""A training state: float32 weights and Adam's two moments (`checkpoint.save_train_state`)."""
FOLDER_BYTES_PER_PARAM = 4
"""An SAE folder: float32 weights (`SAE.save`: `sae_weights.safetensors`, `cfg.json`)."""
FILES_PER_FOLDER = 2
"""The files of an SAE folder or a training state (safetensors and JSON)."""


@dataclass(frozen=True)
class StoreCost:
    """What a phase does to the store its runs dir is on (a shared filesystem or a bucket):
    every file is one write request (PUT) and is kept; what workers read back is egress from the
    store (shards only: model and data downloads come from the hub, resumes are extra)."""

    written: int
    """Bytes written, and kept."""
    files: int
    """Files written (PUT requests on an object store)."""
    read: int
    """Bytes read back by the phase's workers."""

    def __add__(self, other: StoreCost) -> StoreCost:
        return StoreCost(self.written + other.written, self.files + other.files,
                         self.read + other.read)


def group_store(job: JobConfig, d: int, members: Sequence[SAECost], streamed: bool) -> StoreCost:
    """One group's writes and reads: a commit every `checkpoint_every_tokens` up to its largest
    budget (`group.json` and each member still training's state; an upper bound: a member's last
    commit may hold its result instead), each member's SAE folder at each of its checkpoints and
    at its end; cached, its stream reads its sites' shards for its tokens."""
    every = job.train.checkpoint_every_tokens
    tokens = max(m.budget for m in members)
    written = files = 0
    for m in members:
        params = m.sae.spec.parameters(d, m.sae.width(d))
        checkpoints = -(-m.budget // every)
        written += checkpoints * params * (STATE_BYTES_PER_PARAM + FOLDER_BYTES_PER_PARAM)
        written += params * FOLDER_BYTES_PER_PARAM  # the final folder
        files += FILES_PER_FOLDER * (2 * checkpoints + 1)
    files += -(-tokens // every)  # each commit's group.json
    sites = len({m.hook for m in members})
    read = 0 if streamed else tokens * d * BYTES[job.cache.dtype] * sites
    return StoreCost(written, files, read)


def cache_store(job: JobConfig) -> StoreCost:
    """The cache phase writes every site's shards and a manifest per shard set."""
    sets = len(job.cache.sites) * len(job.cache.layers)
    shards = -(-job.data.num_tokens // job.cache.shard_tokens)
    return StoreCost(shard_bytes(job), sets * (shards + 1), 0)


@dataclass(frozen=True)
class SAECost:
    """One SAE training as the plan sees it."""

    model: ModelConfig
    """The model whose activations it reads."""
    hook: str
    sae: SAEConfig
    budget: int


@dataclass(frozen=True)
class PhaseCost:
    name: str
    groups: int
    saes: int
    stream_tokens: int
    """Tokens the phase's streams read (each group reads up to its largest budget)."""
    sae_tokens: int
    """Tokens summed over every SAE of the phase."""
    lm_flops: float
    """Forward FLOPs (cached: the one caching pass; streamed: every group's forward)."""
    sae_flops: float
    """Training FLOPs (SAEs, stitches)."""
    disk_bytes: int
    """Shards written (the cache phase)."""
    memory_per_worker: int
    """The largest group's memory on one worker, its stream included."""
    store: StoreCost = dataclasses.field(default_factory=lambda: StoreCost(0, 0, 0))
    """What the phase writes to and reads from the runs dir's store."""
    seconds: float | None = None
    """Predicted wall time (None without a calibration): the compute at the calibrated
    throughputs, each group's Ray Train start-up and its checkpoint evaluations."""


def cache_phase(job: JobConfig, cal: Calibration | None, slots: int) -> PhaseCost:
    """The caching pass: one forward of `data.num_tokens` tokens up to the deepest cached
    layer, every cached site written."""
    blocks, d = model_dims(job.model)
    deepest = max(job.cache.layers) + 1
    flops = job.data.num_tokens * lm_flops_per_token(d, deepest)
    secs = None
    if cal is not None:
        secs = job.data.num_tokens / cal.forward_tokens_per_s / max(job.cache.num_actors, 1)
    return PhaseCost("cache", 0, 0, job.data.num_tokens, 0, flops, 0, shard_bytes(job), 0,
                     cache_store(job), secs)


def training_phase(job: JobConfig, name: str, saes: Sequence[SAECost], streamed: bool,
                   cal: Calibration | None, slots: int, extra_flops: float = 0.0) -> PhaseCost:
    """A phase of SAE trainings: grouped per model as the sweep groups them, each group one
    stream (its forward when streamed) feeding its SAEs."""
    by_model: dict[str, list[SAECost]] = {}
    for x in saes:
        by_model.setdefault(x.model.name, []).append(x)
    groups = stream = lm = sae_flops = sae_tokens = memory = 0
    store = StoreCost(0, 0, 0)
    busy: list[float] = []
    for members in by_model.values():
        _, d = model_dims(members[0].model)
        overhead, sizes, packed = pack_saes(job, members[0].model,
                                            [(m.sae, m.hook) for m in members], streamed)
        for idx in packed:
            group = [members[i] for i in idx]
            tokens = max(m.budget for m in group)
            deepest = max(parse_hook_name(m.hook)[1] for m in group) + 1
            group_lm = tokens * lm_flops_per_token(d, deepest) if streamed else 0.0
            group_sae = sum(m.budget * sae_step_flops_per_token(m.sae, d) for m in group)
            groups += 1
            stream += tokens
            lm += group_lm
            sae_flops += group_sae
            sae_tokens += sum(m.budget for m in group)
            memory = max(memory, overhead + sum(sizes[i] for i in idx))
            store += group_store(job, d, group, streamed)
            if cal is not None:
                t = sum(m.budget for m in group) / cal.sae_tokens_per_s
                if streamed:
                    t += tokens / cal.forward_tokens_per_s
                # each checkpoint splices the SAE into the LM on the held-out tokens: three
                # forwards (clean, spliced, zero-ablated), on rank 0 alone
                checkpoints = sum(-(-m.budget // job.train.checkpoint_every_tokens) for m in group)
                evals = checkpoints * 3 * job.train.eval_tokens / cal.forward_tokens_per_s
                busy.append(FIT_STARTUP_S + t / job.train.num_workers + evals)
    secs = None
    if cal is not None:
        # groups run `slots` at a time; a phase lasts at least its longest group
        secs = max(sum(busy) / max(min(slots, len(busy)), 1), max(busy, default=0.0))
    return PhaseCost(name, groups, len(saes), stream, sae_tokens, lm, sae_flops + extra_flops,
                     0, memory, store, secs)


def cost_table(phases: Sequence[PhaseCost]) -> str:
    """The plan as a markdown table."""
    head = ("| phase | groups | SAEs | stream tokens | SAE tokens | LM FLOPs | SAE FLOPs | shards "
            "| memory / worker | predicted |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {p.name} | {p.groups} | {p.saes} | {p.stream_tokens:,} | {p.sae_tokens:,} "
        f"| {format_flops(p.lm_flops)} | {format_flops(p.sae_flops)} | {format_bytes(p.disk_bytes)} "
        f"| {format_bytes(p.memory_per_worker)} | "
        f"{'-' if p.seconds is None else format_seconds(p.seconds)} |"
        for p in phases
    ]
    return "\n".join([head, *rows])


def store_table(phases: Sequence[PhaseCost]) -> str:
    """What each phase writes to the runs dir's store and reads back, as a markdown table."""
    head = "| phase | written (kept) | files (PUTs) | read back |\n|---|---|---|---|"
    rows = [f"| {p.name} | {format_bytes(p.store.written)} | {p.store.files:,} "
            f"| {format_bytes(p.store.read)} |" for p in phases]
    return "\n".join([head, *rows])


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:,.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"


def free_bytes(path: str | Path) -> int:
    """Free space of the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def choose_source(job: JobConfig, shard_bytes: int, reads: int, free: int,
                  cal: Calibration | None = None) -> tuple[Literal["cached", "streamed"], str]:
    """The source `train.source: auto` picks, and why. Cached only when its shards fit in the
    free space (with DISK_MARGIN) and the activations are read more than once; with a
    calibration, also only when reading them back is faster than running the forward again."""
    gb = shard_bytes / GiB
    if shard_bytes > DISK_MARGIN * free:
        return "streamed", (f"the shards would take {gb:,.1f} GiB, more than {DISK_MARGIN:.0%} "
                            f"of the {free / GiB:,.1f} GiB free in runs_dir")
    if reads <= 1:
        return "streamed", "each activation is read once: caching would only add a write and a read"
    if cal is not None:
        d = model_dims(job.model)[1]
        per_token_read = d * BYTES[job.cache.dtype] / cal.read_bytes_per_s
        per_token_forward = 1.0 / cal.forward_tokens_per_s
        if per_token_forward < per_token_read * len(job.cache.layers):
            return "streamed", (f"a forward ({per_token_forward * 1e6:.2f} us/token) is cheaper "
                                f"than reading {len(job.cache.layers)} sites back "
                                f"({per_token_read * len(job.cache.layers) * 1e6:.2f} us/token)")
    return "cached", (f"the {reads} reads of {gb:,.2f} GiB of shards fit in the "
                      f"{free / GiB:,.1f} GiB free")


def resolve_source(job: JobConfig, reads: int, cal: Calibration | None = None
                   ) -> tuple[JobConfig, str]:
    """The job with `train.source` decided (auto resolved), and the reason; a cached source
    whose shards do not fit on disk is refused here, before any work."""
    need = shard_bytes(job)
    free = free_bytes(Path(job.runs_dir) / job.cache.out_dir)
    source = job.train.source
    if source == "auto":
        source, why = choose_source(job, need, reads, free, cal)
        why = f"auto: {source}, because {why}"
    elif source == "cached":
        if need > DISK_MARGIN * free:
            from raysae.config import ConfigError

            raise ConfigError(
                f"train.source: cached needs {need:,} bytes of shards ({need / GiB:,.1f} GiB) but "
                f"runs_dir has {free:,} bytes free ({free / GiB:,.1f} GiB; at most "
                f"{DISK_MARGIN:.0%} of it is used); set train.source: streamed"
            )
        why = "cached, as the config says"
    else:
        why = "streamed, as the config says"
    train = dataclasses.replace(job.train, source=source)
    return dataclasses.replace(job, train=train), why


def shard_bytes(job: JobConfig) -> int:
    """Bytes of the job's activation cache: every cached site and layer (special tokens
    included, an upper bound)."""
    d = model_dims(job.model)[1]
    sites = len(job.cache.sites) * len(job.cache.layers)
    return job.data.num_tokens * d * BYTES[job.cache.dtype] * sites


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def format_tokens(n: int) -> str:
    """A token count as people write it: 500M, 1B, 250k (exact multiples only)."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_flops(x: float) -> str:
    if x <= 0:
        return "0"
    e = int(math.floor(math.log10(x)))
    return f"{x / 10**e:.2f}e{e}"


def phase_costs(job: JobConfig, sae_phases: dict[str, list[SAECost]],
                cal: Calibration | None = None, slots: int = 1,
                extra_flops: dict[str, float] | None = None,
                with_cache: bool = True) -> list[PhaseCost]:
    """The cache phase (a cached source, `with_cache`) and every training phase of a job whose
    `train.source` is decided (`resolve_source`)."""
    streamed = job.train.source == "streamed"
    out = [] if streamed or not with_cache else [cache_phase(job, cal, slots)]
    for name, saes in sae_phases.items():
        if saes:
            out.append(training_phase(job, name, saes, streamed, cal, slots,
                                      (extra_flops or {}).get(name, 0.0)))
    return out


def calibrate(job: JobConfig, device: str = "cpu", seconds_each: float = 2.0,
              threads: int | None = None) -> Calibration:
    """Measured throughputs on this machine: the job's truncated forward (random weights of its
    architecture), one SAE training step of its shape, and reads from runs_dir. `threads`: the
    torch threads of the worker that will run them (a Ray worker gets its whole CPUs, at least
    one), else torch's default."""
    import time

    import torch

    def rate(fn, units: int) -> float:
        fn()  # warm-up
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < seconds_each:
            fn()
            n += 1
        return units * n / (time.perf_counter() - start)

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _calibrate(job, device, rate)
    finally:
        torch.set_num_threads(before)


def _calibrate(job: JobConfig, device: str, rate: Callable[[Callable[[], object], int], float]
               ) -> Calibration:
    import os
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from raysae.models import model_hf_config, run_with_cache
    from raysae.sae import SAE
    from raysae.train import sae_trainer

    torch.manual_seed(0)
    hf = model_hf_config(job.model)
    model = AutoModelForCausalLM.from_config(hf).to(device).eval()
    T = min(job.data.context_length, 256)
    ids = torch.randint(0, hf.get_text_config().vocab_size, (4, T), device=device)
    sites = [(s, i) for s in job.cache.sites for i in job.cache.layers]
    forward = rate(lambda: run_with_cache(model, ids, sites), ids.numel())
    d = model_dims(job.model)[1]
    rows = min(job.train.batch_size // job.train.num_workers, 4096)
    sae = SAE(job.sae, d, device=device)
    trainer = sae_trainer(sae, dataclasses.replace(job.train, num_tokens=1 << 60, batch_size=rows))
    x = torch.randn(rows, d, device=device)
    step = rate(lambda: trainer.step(x), rows)
    folder = Path(job.runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        block = os.urandom(1 << 20)
        for _ in range(64):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())

        def read() -> None:
            with open(f.name, "rb") as g:
                os.posix_fadvise(g.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the disk, not RAM
                while g.read(1 << 22):
                    pass

        reads = rate(read, 64 << 20)
    return Calibration(forward, step, reads)


def train_costs(job: JobConfig, cal: Calibration | None = None, slots: int = 1
               ) -> tuple[JobConfig, str, list[PhaseCost]]:
    """The plan of `raysae train`: one scratch SAE per cached site, read once."""
    from raysae.models import hook_name

    job, why = resolve_source(job, reads=1, cal=cal)
    saes = [SAECost(job.model, hook_name(site, layer), job.sae, job.train.num_tokens)
            for layer in job.cache.layers for site in job.cache.sites]
    return job, why, phase_costs(job, {"train": saes}, cal, slots)


def cost_report(job: JobConfig, why: str, phases: Sequence[PhaseCost],
                cal: Calibration | None = None) -> str:
    """What `raysae plan` prints and a sweep logs at its start."""
    lines = [f"{job.name}: activation source {why}", "", cost_table(phases), ""]
    total = sum(p.seconds or 0.0 for p in phases)
    flops = sum(p.lm_flops + p.sae_flops for p in phases)
    disk = sum(p.disk_bytes for p in phases)
    store = sum((p.store for p in phases), StoreCost(0, 0, 0))
    lines.append(f"total: {format_flops(flops)} FLOPs, {format_bytes(disk)} of shards"
                 + (f", predicted {format_seconds(total)}" if cal is not None else ""))
    lines += ["", "store (the runs dir):", "", store_table(phases), "",
              f"store total: {format_bytes(store.written)} written and kept in {store.files:,} "
              f"files, {format_bytes(store.read)} read back"]
    if cal is not None:
        lines.append(f"calibration: forward {cal.forward_tokens_per_s:,.0f} tokens/s, one SAE step "
                     f"{cal.sae_tokens_per_s:,.0f} tokens/s, reads {format_bytes(cal.read_bytes_per_s)}/s")
    return "\n".join(lines)
