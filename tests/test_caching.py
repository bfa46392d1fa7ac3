"""Ray Data caching end to end on a tiny model and a local token file."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch
from conftest import TINY_NEOX, build_cfg

from raysae import shards
from raysae.activations import cache_status
from raysae.config import CacheConfig, ConfigError
from raysae.models import load_lm, run_with_cache

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its reader runs in Ray Data


def _read_shard_batch(batch: dict[str, np.ndarray], directory: str, verify: bool) -> dict[str, np.ndarray]:
    manifest = shards.read_manifest(directory)
    infos = {s.file: s for s in manifest.shards}
    tables = [shards.load_shard(Path(directory), infos[f], verify) for f in batch["file"]]
    table = pa.concat_tables(tables)
    acts = shards.decode_vectors(table.column("acts"), manifest.dtype, manifest.d_model)
    return {
        "acts": acts.float().numpy(),
        "token_id": table.column("token_id").to_numpy(),
        "position": table.column("position").to_numpy(),
    }


def activation_dataset(directory: str | Path, *, verify: bool = True, seed: int | None = 0,
                       **expect: Any):
    """A Ray Dataset of one verified shard set (column `acts`: float32 [d_model] tensors), shard
    order shuffled by `seed`: the shard format read through Ray Data."""
    import ray.data

    reader = shards.ActivationReader(directory, verify=verify, **expect)
    files = [s.file for s in reader.manifest.shards]
    if seed is not None:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    return ray.data.from_items([{"file": f} for f in files]).map_batches(
        _read_shard_batch,
        batch_size=1,
        fn_kwargs={"directory": str(reader.directory), "verify": verify},
    )


@pytest.fixture(scope="module")
def cached(ray_local, tmp_path_factory, token_file):
    from raysae.distributed.caching import cache_activations

    tmp = tmp_path_factory.mktemp("cache")
    cfg = build_cfg(tmp, token_file)
    cfg = build_cfg(tmp, token_file, cache=CacheConfig(
        layers=(0, 2), sites=("resid_post", "resid_pre"), shard_tokens=128, batch_size=3,
        num_actors=2, out_dir=str(tmp / "acts")))
    return cfg, cache_activations(cfg)


def test_cache_matches_direct_forward_token_by_token(cached, token_file):
    cfg, dirs = cached
    assert sorted(dirs) == ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre",
                            "blocks.2.hook_resid_post", "blocks.2.hook_resid_pre"]
    rows = np.stack(pq.read_table(token_file).column("input_ids").to_pylist())
    ids = torch.from_numpy(rows.reshape(-1)[: cfg.data.num_tokens].reshape(-1, 16)).long()
    model = load_lm(cfg.model)
    direct = run_with_cache(model, ids, [("resid_post", 2), ("resid_pre", 0)])
    for name in ["blocks.2.hook_resid_post", "blocks.0.hook_resid_pre"]:
        reader = shards.ActivationReader(dirs[name], layer=int(name.split(".")[1]), d_model=64)
        m = reader.manifest
        assert len(m.shards) == 4 and m.context_length == 16 and m.dtype == "float32"
        n_bos = int((ids == 0).sum())
        assert m.num_tokens == ids.numel() - n_bos  # the BOS positions are excluded
        for info in m.shards:
            t = reader.read_shard(info)
            seq = t.column("seq_index").to_numpy()
            pos = t.column("position").to_numpy()
            assert (t.column("token_id").to_numpy() != 0).all()  # no BOS
            assert np.array_equal(t.column("token_id").to_numpy(), ids[seq, pos].numpy())
            assert torch.allclose(reader.vectors(t), direct[name][seq, pos], atol=1e-5)


def test_rerun_reuses_complete_cache_and_fills_missing(cached, token_file):
    from raysae.distributed.caching import cache_activations

    cfg, dirs = cached
    mtimes = {k: os.path.getmtime(v / shards.MANIFEST) for k, v in dirs.items()}
    assert cache_status(cfg).missing == ()
    assert cache_activations(cfg) == dirs
    assert {k: os.path.getmtime(v / shards.MANIFEST) for k, v in dirs.items()} == mtimes
    # a half-written set (no manifest) is computed again, the complete ones are left alone
    (dirs["blocks.2.hook_resid_pre"] / shards.MANIFEST).unlink()
    assert cache_status(cfg).missing == (("resid_pre", 2),)
    cache_activations(cfg)
    assert os.path.getmtime(dirs["blocks.0.hook_resid_post"] / shards.MANIFEST) == mtimes["blocks.0.hook_resid_post"]
    shards.ActivationReader(dirs["blocks.2.hook_resid_pre"])


def test_ray_dataset_reader(cached):
    _, dirs = cached
    d = dirs["blocks.0.hook_resid_post"]
    ds = activation_dataset(d, layer=0, d_model=64)
    batches = list(ds.iter_torch_batches(batch_size=32, local_shuffle_buffer_size=64))
    got = torch.cat([b["acts"] for b in batches])
    plain = torch.cat(list(shards.ActivationReader(d).iter_batches(1000, shuffle=False)))
    assert got.shape == plain.shape
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert torch.equal(key(got), key(plain))
    with pytest.raises(shards.ShardError, match="site='resid_post', but 'resid_pre'"):
        activation_dataset(d, site="resid_pre")


def test_bad_layer_fails_before_any_work(ray_local, tmp_path, token_file):
    from raysae.distributed.caching import cache_activations

    cfg = build_cfg(tmp_path, token_file, cache=CacheConfig(layers=(5,), out_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="layer 5 is outside"):
        cache_activations(cfg)
    assert not (tmp_path / "a").exists()


def test_cli_commands_join_the_running_ray_instead_of_starting_another(
    ray_local, tmp_path, token_file, capsys
):
    """jobs/demo.py runs one command per config in one process: the second must join the Ray
    the first started (a second ray.init raises)."""
    import yaml

    from raysae.cli import main

    cfg = tmp_path / "cache.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "cli-twice", "model": {"name": "tiny", "from_config": TINY_NEOX},
        "data": {"source": str(token_file), "context_length": 16, "num_tokens": 256},
        "cache": {"layers": [0], "shard_tokens": 128},
        "train": {"num_tokens": 256, "batch_size": 64, "eval_tokens": 256},
    }))
    args = ["cache", str(cfg), "--runs-dir", str(tmp_path / "runs")]
    assert ray_local.is_initialized()
    assert main(args) == 0 and main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "blocks.0.hook_resid_post" in ln]
    assert len(lines) == 2 and lines[0] == lines[1]  # the second reused the first's shards


def test_a_full_disk_under_the_actors_is_the_drivers_clean_error(ray_local, tmp_path, token_file):
    """The actors' failed shard write reaches the driver as the ShardWriteError naming the file
    (not Ray Data's UserCodeException), and no manifest is written."""
    from test_faults_disk import leftovers, tmpfs

    from raysae.distributed.caching import cache_activations

    with tmpfs(tmp_path / "disk", "160k") as disk:  # 8 shards of ~35 KB are needed
        cfg = build_cfg(disk, token_file, cache=CacheConfig(
            layers=(0, 2), sites=("resid_post",), shard_tokens=128, out_dir="acts"))
        with pytest.raises(shards.ShardWriteError, match=r"could not write \S+/shard-\d+\.arrow "
                                                         r"\(\d+ bytes; \d+ bytes free there\)"):
            cache_activations(cfg)
        assert not list(disk.rglob(shards.MANIFEST)) and leftovers(disk) == []
        assert cache_status(cfg).missing == (("resid_post", 0), ("resid_post", 2))
