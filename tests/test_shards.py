"""The shard format on its own: dtype round trips, atomic files, every failure named."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from raysae import shards


def write_set(tmp_path, dtype="float32", n_shards=3, n=50, d=8):
    torch.manual_seed(0)
    xs, infos = [], []
    for k in range(n_shards):
        x = torch.randn(n, d) * 10
        buf = shards.shard_bytes(x, np.arange(n), np.arange(n) % 7, np.full(n, k), dtype)
        infos.append(shards.write_shard(tmp_path, f"shard-{k:09d}.arrow", buf, n))
        xs.append(x)
    m = shards.Manifest(model="m", revision=None, site="resid_post", layer=1,
                        hook_name="blocks.1.hook_resid_post", d_model=d, dtype=dtype,
                        context_length=16, dataset="d", fingerprint="f", num_tokens=n * n_shards,
                        shards=tuple(infos))
    shards.write_manifest(tmp_path, m)
    return torch.cat(xs), m


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", 0), ("float16", 2**-11), ("bfloat16", 2**-8)])
def test_dtype_round_trip_within_precision(tmp_path, dtype, rtol):
    x, _ = write_set(tmp_path, dtype)
    reader = shards.ActivationReader(tmp_path, d_model=8, layer=1)
    got = torch.cat(list(reader.iter_batches(64, shuffle=False)))
    assert got.dtype == torch.float32 and got.shape == x.shape
    err = ((got - x).abs() / x.abs().clamp_min(1e-3)).max().item()
    assert err <= rtol
    if dtype == "bfloat16":  # the stored bits are exactly torch's bf16 rounding
        assert torch.equal(got, x.to(torch.bfloat16).float())


def test_plain_pyarrow_and_polars_read_a_shard(tmp_path):
    x, m = write_set(tmp_path, n_shards=1)
    table = pa.ipc.open_file(tmp_path / m.shards[0].file).read_all()
    assert table.schema.field("acts").type == pa.list_(pa.float32(), 8)
    df = pl.read_ipc(tmp_path / m.shards[0].file)
    assert df.shape == (50, 4) and df["position"].max() == 6
    assert np.allclose(np.stack(df["acts"].to_list()), x.numpy())


def test_shuffled_batches_cover_every_row_once(tmp_path):
    x, _ = write_set(tmp_path, n_shards=4, n=37)
    reader = shards.ActivationReader(tmp_path)
    batches = list(reader.iter_batches(16, shuffle=True, seed=3, buffer_shards=2))
    assert all(len(b) == 16 for b in batches[:-1])
    got = torch.cat(batches)
    assert not torch.equal(got, x)  # shuffled...
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert torch.equal(key(got), key(x))  # ...but every row exactly once
    again = torch.cat(list(reader.iter_batches(16, shuffle=True, seed=3, buffer_shards=2)))
    assert torch.equal(again, got)  # and deterministic per seed


def test_errors_name_the_problem(tmp_path):
    _, m = write_set(tmp_path)
    with pytest.raises(shards.ShardError, match=r"manifest has layer=1, but 2 was requested"):
        shards.ActivationReader(tmp_path, layer=2)
    with pytest.raises(shards.ShardError, match="d_model=8, but 16"):
        shards.ActivationReader(tmp_path, d_model=16)

    first = tmp_path / m.shards[0].file
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    reader = shards.ActivationReader(tmp_path)  # same size: caught by the checksum on read
    with pytest.raises(shards.ShardError, match=f"shard .*{m.shards[0].file} is corrupted"):
        list(reader.iter_batches(10, shuffle=False))

    second = tmp_path / m.shards[1].file
    second.write_bytes(second.read_bytes()[:-10])
    with pytest.raises(shards.ShardError, match=f"{m.shards[1].file} is truncated"):
        shards.ActivationReader(tmp_path)
    second.unlink()
    with pytest.raises(shards.ShardError, match=f"{m.shards[1].file} is missing"):
        shards.ActivationReader(tmp_path)
    (tmp_path / shards.MANIFEST).unlink()
    with pytest.raises(shards.ShardError, match="no manifest.json, so the activation cache is incomplete"):
        shards.ActivationReader(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_set(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
