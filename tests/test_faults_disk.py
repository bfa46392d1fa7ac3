"""A disk that fills while caching: a real ENOSPC from a small tmpfs (mounting needs root, as in
CI; elsewhere these tests are skipped). The failed write names the shard and its bytes, leaves
no temporary file and no manifest, and a run on a disk with room computes the set again. The
same write under Ray Data actors is in test_caching.py."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import build_cfg

from raysae import shards
from raysae.activations import (
    ShardCacher,
    cache_status,
    job_tokens,
    prepare_dirs,
    special_token_ids,
    write_manifests,
)
from raysae.config import CacheConfig, JobConfig
from raysae.models import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's units: 64k, 2m) mounted at `path` for the block; skipped
    without the right to mount (failed in CI, which runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        msg = f"cannot mount a tmpfs at {path} (root needed): {done.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def resize(path: Path, size: str) -> None:
    """Free space the way an operator would: the same tmpfs, made larger."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def leftovers(root: Path) -> list[str]:
    """Temporary files of interrupted writes under root."""
    return sorted(p.name for p in root.rglob(".*.tmp-*"))


def fill(directory: Path) -> None:
    """Use up every free byte of the disk holding `directory`."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_shard_that_does_not_fit_is_named_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "64k") as disk:
        x = torch.randn(120, 64)  # ~31 KB of float32 per shard: the second one does not fit
        buf = shards.shard_bytes(x, np.arange(120), np.arange(120), np.zeros(120), "float32")
        first = shards.write_shard(disk, "shard-000000000.arrow", buf, 120)
        with pytest.raises(shards.ShardWriteError) as caught:
            shards.write_shard(disk, "shard-000000008.arrow", buf, 120)
        err = caught.value
        assert err.errno == errno.ENOSPC and isinstance(err, OSError)
        assert f"could not write {disk / 'shard-000000008.arrow'} ({buf.size} bytes;" in str(err)
        assert "No space left on device" in str(err)
        assert sorted(p.name for p in disk.iterdir()) == ["shard-000000000.arrow"]  # no temp file
        assert pa.ipc.open_file(disk / first.file).read_all().num_rows == 120  # intact

        fill(disk)  # the manifest, the set's completion marker, is written the same way
        manifest = shards.Manifest(
            model="m", revision=None, site="resid_post", layer=0, hook_name="h", d_model=64,
            dtype="float32", context_length=16, dataset="d", fingerprint="f", num_tokens=120,
            shards=(first,))
        with pytest.raises(shards.ShardWriteError, match=f"could not write {disk / shards.MANIFEST}"):
            shards.write_manifest(disk, manifest)
        assert not (disk / shards.MANIFEST).exists() and leftovers(disk) == []
        with pytest.raises(shards.ShardError, match="no manifest.json"):
            shards.ActivationReader(disk)


def cache_in_process(job: JobConfig) -> dict[str, Path]:
    """What `distributed.caching.cache_activations` does, with one in-process ShardCacher in
    place of the Ray Data actor pool: the plan, emptied directories, one shard per batch of
    sequences and site, the manifests last."""
    plan = cache_status(job)
    prepare_dirs(plan)
    tokens_NT = job_tokens(job, job.data.num_tokens)
    per_shard = job.cache.shard_tokens // job.data.context_length
    cacher = ShardCacher(job.model, list(plan.missing), {k: str(v) for k, v in plan.dirs.items()},
                         job.cache.dtype, job.cache.batch_size,
                         special_token_ids(job.model, load_tokenizer(job.model, job.data)))
    records = []
    for s in range(0, len(tokens_NT), per_shard):
        ids = tokens_NT[s : s + per_shard]
        records += cacher(np.arange(s, s + len(ids)), ids)
    write_manifests(job, plan, records)
    return plan.dirs


def test_caching_onto_a_full_disk_fails_cleanly_and_a_rerun_redoes_it(
    tmp_path: Path, token_file: Path
) -> None:
    with tmpfs(tmp_path / "disk", "160k") as disk:  # 8 shards of ~35 KB are needed
        job = build_cfg(disk, token_file, cache=CacheConfig(
            layers=(0, 2), sites=("resid_post",), shard_tokens=128, out_dir="acts"))
        with pytest.raises(shards.ShardWriteError) as caught:
            cache_in_process(job)
        msg = str(caught.value)
        assert caught.value.errno == errno.ENOSPC
        assert f"could not write {disk / 'acts'}/" in msg and ".arrow (" in msg and " bytes;" in msg
        named = Path(msg.split("could not write ")[1].split(" (")[0])
        assert named.name.startswith("shard-") and not named.exists()
        assert leftovers(disk) == []
        assert not list(disk.rglob(shards.MANIFEST))  # no set looks complete
        for f in disk.rglob("shard-*.arrow"):  # the shards that made it are whole files
            assert pa.ipc.open_file(f).read_all().num_rows > 0
        assert cache_status(job).missing == (("resid_post", 0), ("resid_post", 2))

        resize(disk, "2m")
        dirs = cache_in_process(job)
        assert cache_status(job).missing == ()
        for d in dirs.values():
            reader = shards.ActivationReader(d, d_model=64)  # checks every shard's size
            assert len(reader.manifest.shards) == 4
            assert sum(len(b) for b in reader.iter_batches(1000, shuffle=False)) == reader.num_tokens
        assert leftovers(disk) == []
