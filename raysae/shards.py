"""The activation shard format: write, read and verify (pure pyarrow + numpy + torch).

One directory per (model, site, layer) holds Arrow IPC files `shard-<first seq>.arrow` and a
`manifest.json` written last. Each shard is an uncompressed Arrow IPC file with columns

    acts      fixed_size_list<float32 | float16 | uint16>[d_model]   (uint16 = raw bfloat16 bits)
    token_id  int32      position  int32      seq_index  int64

Why Arrow IPC rather than parquet: the vectors are incompressible floats, so parquet's encoding
buys nothing and costs a decode on every read; an IPC file is the in-memory layout, read back
with no copy, and plain `pyarrow.ipc` and `polars.read_ipc` open it without Ray. bfloat16 has
no Arrow type: its 16 bits are stored as uint16 and the manifest's `dtype` says how to view them
(`torch.from_numpy(u16).view(torch.bfloat16)`).

A shard set is complete only when its manifest exists: shards are written to a temporary name
and renamed, and the manifest (with each shard's size and SHA-256) comes after all of them. A
write that fails (a full disk) removes its temporary file and raises `ShardWriteError` naming the
file and its size; the set then has no manifest, and the next run computes it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

_STORAGE = {"float32": (torch.float32, pa.float32()), "float16": (torch.float16, pa.float16())}
_STORAGE["bfloat16"] = (torch.bfloat16, pa.uint16())


class ShardError(RuntimeError):
    """A shard set does not match the request, or a shard is missing, truncated or corrupted."""


class ShardWriteError(OSError):
    """A shard or manifest could not be written (a full disk, a quota): names the file and its
    size. The partial file is gone, and the set has no manifest, so it does not look complete."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest records it."""

    file: str
    num_tokens: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a shard directory holds; written last, so its presence marks a complete set."""

    model: str
    revision: str | None
    site: str
    layer: int
    hook_name: str
    d_model: int
    dtype: str
    context_length: int
    dataset: str
    fingerprint: str
    num_tokens: int
    shards: tuple[ShardInfo, ...]
    exclude_special: bool = True
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["shards"] = tuple(ShardInfo(**s) for s in data["shards"])
        return cls(**data)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary name in the same directory, flush it to the disk, then rename: never
    a half-written file under the final name. On failure the temporary file is removed and
    `ShardWriteError` names the file, its size and the free space (fsync first, because some
    file systems report a full disk only when the data is flushed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ShardWriteError(
            e.errno,
            f"could not write {path} ({len(data)} bytes; {_free_bytes(path.parent)} bytes free "
            f"there): {e.strerror or e}. The partial file was removed; free space and run again",
        ) from e


def _free_bytes(directory: Path) -> int | str:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return "unknown"


def encode_vectors(acts_ND: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """[N, D] tensor -> fixed_size_list array in the storage dtype."""
    torch_dtype, _ = _STORAGE[dtype]
    x = acts_ND.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bfloat16":
        x = x.view(torch.uint16)
    flat = pa.array(x.reshape(-1).numpy())
    return pa.FixedSizeListArray.from_arrays(flat, acts_ND.shape[1])


def decode_vectors(column: pa.ChunkedArray | pa.Array, dtype: str, d_model: int) -> torch.Tensor:
    """fixed_size_list column -> [N, D] tensor in the storage dtype (zero-copy where possible)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).reshape(-1, d_model)
    with warnings.catch_warnings():  # Arrow memory is read-only; callers only read or copy it
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(values)
    return x.view(torch.bfloat16) if dtype == "bfloat16" else x


def shard_bytes(
    acts_ND: torch.Tensor,
    token_ids: np.ndarray,
    positions: np.ndarray,
    seq_index: np.ndarray,
    dtype: str,
) -> pa.Buffer:
    """Serialize one shard to an in-memory Arrow IPC file."""
    table = pa.table(
        {
            "acts": encode_vectors(acts_ND, dtype),
            "token_id": pa.array(np.asarray(token_ids, dtype=np.int32)),
            "position": pa.array(np.asarray(positions, dtype=np.int32)),
            "seq_index": pa.array(np.asarray(seq_index, dtype=np.int64)),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def write_shard(directory: Path, name: str, buf: pa.Buffer, num_tokens: int) -> ShardInfo:
    """Write serialized shard bytes atomically; return its manifest entry."""
    data = memoryview(buf)
    atomic_write_bytes(directory / name, data)
    return ShardInfo(name, num_tokens, len(data), hashlib.sha256(data).hexdigest())


def write_manifest(directory: Path, manifest: Manifest) -> None:
    text = json.dumps(dataclasses.asdict(manifest), indent=1)
    atomic_write_bytes(directory / MANIFEST, text.encode())


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory}: no {MANIFEST}, so the activation cache is incomplete")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from None


def check_manifest(manifest: Manifest, directory: Path, **expect: Any) -> None:
    """Raise ShardError naming the first field whose value differs from what is requested."""
    for key, want in expect.items():
        if want is None:
            continue
        have = getattr(manifest, key)
        if have != want:
            raise ShardError(f"{directory}: manifest has {key}={have!r}, but {want!r} was requested")


def load_shard(directory: Path, info: ShardInfo, verify: bool = True) -> pa.Table:
    """Read one shard, checking its size and checksum against the manifest."""
    path = directory / info.file
    if not path.is_file():
        raise ShardError(f"shard {path} is missing")
    data = path.read_bytes()
    if len(data) != info.num_bytes:
        raise ShardError(
            f"shard {path} is truncated or altered: {len(data)} bytes, manifest says {info.num_bytes}"
        )
    if verify and hashlib.sha256(data).hexdigest() != info.sha256:
        raise ShardError(f"shard {path} is corrupted: its SHA-256 does not match the manifest")
    try:
        return pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as e:
        raise ShardError(f"shard {path} is not a readable Arrow IPC file ({e})") from None


class ActivationReader:
    """Reads one verified shard set as batches of activation vectors, without Ray."""

    def __init__(
        self,
        directory: str | Path,
        *,
        verify: bool = True,
        **expect: Any,
    ) -> None:
        """`expect` holds manifest fields to check (model, site, layer, d_model, ...)."""
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        check_manifest(self.manifest, self.directory, **expect)
        self.verify = verify
        for info in self.manifest.shards:  # cheap up-front check; checksums are verified on read
            path = self.directory / info.file
            if not path.is_file():
                raise ShardError(f"shard {path} is missing")
            if path.stat().st_size != info.num_bytes:
                raise ShardError(
                    f"shard {path} is truncated or altered: {path.stat().st_size} bytes, "
                    f"manifest says {info.num_bytes}"
                )

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    def read_shard(self, info: ShardInfo) -> pa.Table:
        return load_shard(self.directory, info, self.verify)

    def vectors(self, table: pa.Table) -> torch.Tensor:
        return decode_vectors(table.column("acts"), self.manifest.dtype, self.manifest.d_model)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shards: Sequence[ShardInfo] | None = None,
        buffer_shards: int = 4,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Batches [batch_size, d_model] (the last may be smaller). With shuffle, shards come in a
        seeded random order and rows are shuffled across a buffer of `buffer_shards` shards."""
        shards = list(self.manifest.shards if shards is None else shards)
        gen = torch.Generator().manual_seed(seed)
        if shuffle:
            shards = [shards[i] for i in torch.randperm(len(shards), generator=gen)]
        pending: list[torch.Tensor] = []
        for i, info in enumerate(shards):
            pending.append(self.vectors(self.read_shard(info)).to(dtype))
            if len(pending) < buffer_shards and i < len(shards) - 1:
                continue
            x = torch.cat(pending)
            pending = []
            if shuffle:
                x = x[torch.randperm(len(x), generator=gen)]
            full = len(x) - len(x) % batch_size if i < len(shards) - 1 else len(x)
            for s in range(0, full, batch_size):
                yield x[s : s + batch_size]
            if full < len(x):
                pending.append(x[full:])


def aligned_shards(a: ActivationReader, b: ActivationReader) -> list[tuple[ShardInfo, ShardInfo]]:
    """The shard pairs of two caches of the same tokens (two models, or two layers): same files,
    same row counts; rows are checked token by token when read (`paired_stream`)."""
    files_a = [(s.file, s.num_tokens) for s in a.manifest.shards]
    files_b = [(s.file, s.num_tokens) for s in b.manifest.shards]
    if files_a != files_b:
        raise ShardError(
            f"{a.directory} and {b.directory} do not hold the same tokens (shard files or row "
            "counts differ); cache both with the same data and cache settings"
        )
    return list(zip(a.manifest.shards, b.manifest.shards))


def paired_stream(
    a: ActivationReader,
    b: ActivationReader,
    batch_size: int,
    *,
    seed: int = 0,
    pairs: Sequence[tuple[ShardInfo, ShardInfo]] | None = None,
    passes: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) batches of exactly batch_size rows of the same tokens over `passes` shuffled
    passes of the shard pairs, both sides permuted alike (rows left over open the next pass,
    the last pass's remainder is dropped). Raises ShardError when a pair's token_id, seq_index
    or position columns disagree."""
    pairs = list(aligned_shards(a, b) if pairs is None else pairs)
    if not pairs or sum(p[0].num_tokens for p in pairs) == 0:
        raise ShardError(f"{a.directory}: no activation rows to stream")
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for epoch in range(passes):
        gen = torch.Generator().manual_seed(seed + epoch)
        for i in torch.randperm(len(pairs), generator=gen).tolist():
            info_a, info_b = pairs[i]
            ta, tb = a.read_shard(info_a), b.read_shard(info_b)
            for col in ("token_id", "seq_index", "position"):
                if not ta.column(col).equals(tb.column(col)):
                    raise ShardError(
                        f"{a.directory / info_a.file} and {b.directory / info_b.file}: column "
                        f"{col} differs; the two caches do not hold the same tokens"
                    )
            perm = torch.randperm(ta.num_rows, generator=gen)
            xa, xb = a.vectors(ta).float()[perm], b.vectors(tb).float()[perm]
            if carry is not None:
                xa, xb = torch.cat([carry[0], xa]), torch.cat([carry[1], xb])
                carry = None
            while len(xa) >= batch_size:
                yield xa[:batch_size], xb[:batch_size]
                xa, xb = xa[batch_size:], xb[batch_size:]
            if len(xa):
                carry = (xa, xb)
