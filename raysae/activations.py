"""From a token source to activation shards, without Ray: the token stream, the cache status
(which shard directories a job needs and which already exist), and the per-batch work an LM
actor does (one truncated forward, one shard per hooked site). `distributed/caching.py` runs
the same `ShardCacher` inside Ray Data actors.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from raysae import shards
from raysae.config import ConfigError, JobConfig, ModelConfig, digest, local_path, to_dict
from raysae.models import (
    hook_name,
    load_lm,
    load_tokenizer,
    model_hf_config,
    run_with_cache,
    validate_sites,
)

log = logging.getLogger("raysae.activations")

_LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}


# ---------------------------------------------------------------------------------------------
# Tokens


def check_source(source: str, field: str = "data.source") -> None:
    """Refuse a source that can only be a local path (`config.local_path`) but names nothing
    there; a hub dataset name is left to `datasets` (checking it would need the network)."""
    path = local_path(source)
    if path is not None and not path.exists():
        raise ConfigError(
            f"{field}: no file or folder at {source!r}; expected an existing local file or "
            "folder, or a hub dataset name like 'org/name'"
        )


def load_rows(source: str, split: str, column: str) -> Iterable[Any]:
    """Stream one column of a `datasets` hub dataset or of local parquet/arrow/jsonl files."""
    import datasets  # heavy import, only needed here

    check_source(source)
    path = local_path(source) or Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_FORMATS) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"data.source: {source!r} holds no .parquet/.arrow/.jsonl files")
        kinds = {_LOCAL_FORMATS.get(p.suffix) for p in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(
                f"data.source: {source!r} must be files of one kind among "
                f"{sorted(_LOCAL_FORMATS)}, got {sorted(p.suffix for p in files)}"
            )
        ds = datasets.load_dataset(
            kinds.pop(), data_files=[str(p) for p in files], split="train", streaming=True
        )
    else:
        ds = datasets.load_dataset(source, split=split, streaming=True)
    if ds.column_names is not None and column not in ds.column_names:
        raise ValueError(
            f"data.column: {column!r} is not a column of {source!r}; columns: {ds.column_names}"
        )
    return (row[column] for row in ds)


def iter_windows(
    rows: Iterable[Any],
    context_length: int,
    num_tokens: int,
    tokenizer: Any | None = None,
    prepend_bos: bool = False,
    skip_tokens: int = 0,
) -> Iterator[np.ndarray]:
    """Pack rows (token-id lists, or texts with a tokenizer) into context_length int32 windows,
    lazily, until num_tokens is reached, after dropping the windows that cover the first
    skip_tokens (held-out data follows the training data this way). Documents are joined with
    EOS when texts are tokenized. Raises when the source runs out first."""
    n_seq = -(-num_tokens // context_length)
    skip = -(-skip_tokens // context_length)
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer is not None else []
    body = context_length - len(bos)
    buf: list[int] = []
    filled = 0
    if n_seq == 0:
        return
    for row in rows:
        if isinstance(row, str):
            if tokenizer is None:
                raise ValueError("data.column holds text but no tokenizer is known: set data.tokenizer")
            ids = tokenizer(row, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        else:
            ids = list(row)
        buf.extend(ids)
        while len(buf) >= body and filled < n_seq:
            if skip:
                skip -= 1
            else:
                yield np.asarray(bos + buf[:body], dtype=np.int32)
                filled += 1
            del buf[:body]
        if filled == n_seq:
            return
    raise ValueError(
        f"data.source: the source ran out after {filled * context_length + len(buf)} of the "
        f"{num_tokens} tokens requested (after skipping {skip_tokens})"
    )


def job_windows(job: JobConfig, num_tokens: int, skip_tokens: int = 0) -> Iterator[np.ndarray]:
    """The job's token windows, lazily: the training ones (skip 0), or held-out ones after."""
    data = job.data
    return iter_windows(
        load_rows(data.source, data.split, data.column),
        data.context_length,
        num_tokens,
        load_tokenizer(job.model, data),
        data.prepend_bos,
        skip_tokens,
    )


def job_tokens(job: JobConfig, num_tokens: int, skip_tokens: int = 0) -> np.ndarray:
    """The job's token windows [n_seq, context_length]: the cached ones (skip 0), or held-out
    ones after them."""
    return np.stack(list(job_windows(job, num_tokens, skip_tokens)))


def heldout_tokens(job: JobConfig) -> torch.Tensor:
    """The evaluation windows [N, T] (int64): `train.eval_tokens` tokens right after the cached
    ones, never trained on. Reaching them reads `data.num_tokens` tokens of the corpus first
    (1B at the paper configs), so that is done once per runs dir: the first reader (the job's
    driver, before any work) keeps them at `heldout_path`, written whole under a temporary name
    with the digest of their bytes; every group, zero-shot and feature task, on any node, reads
    that file and checks the digest."""
    path = heldout_path(job)
    if not path.exists():
        keep_heldout(job, job_tokens(job, job.train.eval_tokens, skip_tokens=job.data.num_tokens))
    with safe_open(path, "pt") as f:
        tokens, want = f.get_tensor("tokens"), (f.metadata() or {}).get("sha256")
    if _sha256(tokens) != want:
        raise ValueError(f"{path}: the held-out windows do not match their digest {want}; "
                         "delete the file to read them from the corpus again")
    return tokens.long()


def keep_heldout(job: JobConfig, tokens_NT: np.ndarray) -> None:
    """Keep the job's held-out windows at `heldout_path` (see `heldout_tokens`)."""
    path = heldout_path(job)
    tokens = torch.from_numpy(np.ascontiguousarray(tokens_NT))
    path.parent.mkdir(parents=True, exist_ok=True)
    shards.atomic_write_bytes(path, save({"tokens": tokens}, metadata={"sha256": _sha256(tokens)}))


def heldout_path(job: JobConfig) -> Path:
    """Where the job's held-out windows are kept: beside the activation cache, named by what
    they depend on (the model's tokenizer, the data settings, `train.eval_tokens`)."""
    key = digest({"model": to_dict(job.model), "data": to_dict(job.data),
                  "eval_tokens": job.train.eval_tokens})
    return Path(job.runs_dir) / job.cache.out_dir / "heldout" / f"{key}.safetensors"


def _sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def special_token_ids(model: ModelConfig, tokenizer: Any | None) -> list[int]:
    """BOS/EOS/PAD (and any other special) ids: from the tokenizer, else the model config."""
    if tokenizer is not None:
        return sorted(set(tokenizer.all_special_ids))
    cfg = model_hf_config(model)
    return sorted({i for i in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if i is not None})


# ---------------------------------------------------------------------------------------------
# The cache status


def fingerprint(job: JobConfig) -> str:
    """A stable key over everything that changes the activations of a shard set."""
    key = {
        "model": to_dict(job.model),
        "data": to_dict(job.data),
        "dtype": job.cache.dtype,
        "exclude_special": job.cache.exclude_special,
        "format": shards.FORMAT_VERSION,
    }
    return digest(key)


@dataclass(frozen=True)
class CacheStatus:
    """Where each requested site's shards live, and which must still be computed."""

    fingerprint: str
    d_model: int
    dirs: dict[str, Path]
    """hook name -> shard directory"""
    missing: tuple[tuple[str, int], ...]
    """(site, layer) pairs with no complete shard set yet"""


def cache_status(job: JobConfig) -> CacheStatus:
    """Validate the sites against the model (cheap: config only) and find what is missing."""
    d_model = validate_sites(job.model, job.cache.sites, job.cache.layers)
    fp = fingerprint(job)
    root = Path(job.runs_dir) / job.cache.out_dir / fp
    dirs, missing = {}, []
    for layer in job.cache.layers:
        for site in job.cache.sites:
            name = hook_name(site, layer)
            dirs[name] = root / name
            try:
                if shards.read_manifest(dirs[name]).fingerprint == fp:
                    continue
            except shards.ShardError:
                pass
            missing.append((site, layer))
    return CacheStatus(fp, d_model, dirs, tuple(missing))


def prepare_dirs(status: CacheStatus) -> None:
    """Empty the directories about to be (re)computed so no stale shard survives."""
    for site, layer in status.missing:
        d = status.dirs[hook_name(site, layer)]
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)


def write_manifests(job: JobConfig, status: CacheStatus, results: Iterable[dict[str, Any]]) -> None:
    """Write each computed directory's manifest, last, from the shard records of the actors."""
    by_hook: dict[str, list[shards.ShardInfo]] = {}
    for r in results:
        by_hook.setdefault(r["hook_name"], []).append(
            shards.ShardInfo(r["file"], int(r["num_tokens"]), int(r["num_bytes"]), r["sha256"])
        )
    for site, layer in status.missing:
        name = hook_name(site, layer)
        infos = tuple(sorted(by_hook.get(name, []), key=lambda s: s.file))
        manifest = shards.Manifest(
            model=job.model.name,
            revision=job.model.revision,
            site=site,
            layer=layer,
            hook_name=name,
            d_model=status.d_model,
            dtype=job.cache.dtype,
            context_length=job.data.context_length,
            dataset=job.data.source,
            fingerprint=status.fingerprint,
            num_tokens=sum(s.num_tokens for s in infos),
            shards=infos,
            exclude_special=job.cache.exclude_special,
        )
        shards.write_manifest(status.dirs[name], manifest)


# ---------------------------------------------------------------------------------------------
# The work of one LM actor


class ShardCacher:
    """Holds an LM; turns a batch of sequences into one shard per requested site."""

    def __init__(
        self,
        model: ModelConfig,
        sites: list[tuple[str, int]],
        dirs: dict[str, str],
        dtype: str,
        batch_size: int,
        special_ids: list[int],
        device: str = "cpu",
    ) -> None:
        self.model = load_lm(model, device)
        self.sites = [tuple(s) for s in sites]
        self.dirs = {k: Path(v) for k, v in dirs.items()}
        self.dtype = dtype
        self.batch_size = batch_size
        self.special = torch.tensor(special_ids, dtype=torch.long)
        self.device = device

    def activations(self, input_ids_NT: torch.Tensor) -> dict[str, torch.Tensor]:
        """[N, T, D] per hook name, forward in sub-batches of batch_size sequences."""
        parts: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(input_ids_NT), self.batch_size):
            ids = input_ids_NT[s : s + self.batch_size].to(self.device)
            for name, x in run_with_cache(self.model, ids, self.sites).items():
                parts.setdefault(name, []).append(x.to("cpu", torch.float32))
        return {name: torch.cat(xs) for name, xs in parts.items()}

    def __call__(self, seq_index: np.ndarray, input_ids_NT: np.ndarray) -> list[dict[str, Any]]:
        ids_NT = torch.from_numpy(np.ascontiguousarray(input_ids_NT)).long()
        n, t = ids_NT.shape
        keep = ~torch.isin(ids_NT, self.special).reshape(-1)
        tokens = ids_NT.reshape(-1)[keep].numpy()
        positions = torch.arange(t).repeat(n)[keep].numpy()
        seqs = torch.from_numpy(np.asarray(seq_index, dtype=np.int64)).repeat_interleave(t)[keep].numpy()
        file = f"shard-{int(seq_index[0]):09d}.arrow"
        records = []
        for name, acts_NTD in self.activations(ids_NT).items():
            acts = acts_NTD.reshape(n * t, -1)[keep]
            buf = shards.shard_bytes(acts, tokens, positions, seqs, self.dtype)
            info = shards.write_shard(self.dirs[name], file, buf, len(tokens))
            records.append({"hook_name": name, **info.__dict__})
        log.info("wrote %s (%d tokens) for %d sites", file, len(tokens), len(records))
        return records
