"""Activation sources: exact batches from chunks, passes, skipping on resume, and the same
batches from cached shards and from the LM itself (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_cfg

from raysae.activations import job_tokens, special_token_ids
from raysae.config import CacheConfig, DataConfig
from raysae.models import hook_name, load_lm, load_tokenizer
from raysae.shards import ActivationReader
from raysae.sources import (
    Chunk,
    LMActivations,
    StreamSettings,
    batches_from_chunks,
    cached_chunks,
    streamed_chunks,
)


def numbered_chunks(sizes: list[int]):
    """Chunks whose rows are their global row numbers, one hook 'h', width 1."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def chunks(_pass, _gen):
        for start, n in zip(starts, sizes):
            yield Chunk(n, lambda start=start, n=n: {"h": torch.arange(start, start + n).float()[:, None]})

    return chunks


def rows(batches) -> list[list[int]]:
    return [b["h"][:, 0].long().tolist() for b in batches]


def test_in_order_batches_are_exact_and_drop_only_the_final_remainder() -> None:
    got = rows(batches_from_chunks(numbered_chunks([5, 3, 9]), StreamSettings(batch_size=4, shuffle=False,
                                                                            buffer_chunks=2)))
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # row 16 dropped


def test_shuffled_batches_cover_every_row_once_per_pass() -> None:
    s = StreamSettings(batch_size=4, shuffle=True, seed=3, passes=2, buffer_chunks=2)
    got = rows(batches_from_chunks(numbered_chunks([5, 3, 9, 7]), s))
    flat = [r for b in got for r in b]
    assert len(flat) == 48 and all(len(b) == 4 for b in got)
    assert sorted(flat) == sorted(list(range(24)) * 2)  # every row once per pass
    assert flat[:24] != list(range(24))  # really shuffled


def test_a_budget_beyond_one_pass_runs_out_unless_passes_are_asked_for() -> None:
    one = list(batches_from_chunks(numbered_chunks([8, 8]), StreamSettings(batch_size=4)))
    two = list(batches_from_chunks(numbered_chunks([8, 8]), StreamSettings(batch_size=4, passes=2)))
    assert (len(one), len(two)) == (4, 8)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("skip", [0, 1, 3, 5, 6, 9])
def test_skipping_gives_exactly_the_rest_of_the_stream_and_loads_less(shuffle, skip) -> None:
    sizes = [5, 3, 9, 2, 6, 7]
    loads = []

    def counted(p, gen):
        for c in numbered_chunks(sizes)(p, gen):
            yield Chunk(c.rows, lambda c=c: (loads.append(c.rows), c.load())[1])

    s = StreamSettings(batch_size=4, shuffle=shuffle, seed=1, passes=2, buffer_chunks=2)
    full = rows(batches_from_chunks(numbered_chunks(sizes), s))
    resumed = rows(batches_from_chunks(counted, dataclasses.replace(s, skip_batches=skip)))
    assert resumed == full[skip:]
    if skip >= 6:
        assert len(loads) < 2 * len(sizes)  # buffers wholly before the resume point were counted


@pytest.fixture(scope="module")
def cached_job(tmp_path_factory, token_file, ray_local):
    from raysae.distributed.caching import cache_activations

    tmp = tmp_path_factory.mktemp("sources")
    cfg = build_cfg(tmp, token_file, data=DataConfig(source=str(token_file), context_length=16,
                                                     num_tokens=1024),
                    cache=CacheConfig(layers=(0, 2), shard_tokens=128, out_dir=str(tmp / "acts")))
    return cfg, {k: str(v) for k, v in cache_activations(cfg).items()}


@pytest.mark.ray
@pytest.mark.parametrize("world", [1, 2])
def test_streamed_and_cached_sources_give_the_same_batches(cached_job, world) -> None:
    cfg, dirs = cached_job
    readers = {h: ActivationReader(d) for h, d in dirs.items()}
    sites = [("resid_post", 0), ("resid_post", 2)]
    lm = LMActivations(load_lm(cfg.model), sites, special_token_ids(cfg.model, load_tokenizer(cfg.model, cfg.data)),
                       cfg.cache.batch_size, "cpu")
    windows = lambda: iter(job_tokens(cfg, cfg.data.num_tokens))  # noqa: E731
    chunk_seqs = cfg.cache.shard_tokens // cfg.data.context_length
    for rank in range(world):
        s = StreamSettings(batch_size=64, rank=rank, world=world, shuffle=False, passes=2)
        cached = list(batches_from_chunks(cached_chunks(readers, rank, world, shuffle=False), s))
        streamed = list(batches_from_chunks(streamed_chunks(lm, windows, chunk_seqs, rank, world), s))
        assert len(cached) == len(streamed) > 4
        for a, b in zip(cached, streamed):
            assert set(a) == set(b) == {hook_name(*site) for site in sites}
            for h in a:
                torch.testing.assert_close(a[h], b[h], rtol=1e-5, atol=1e-5)


def test_heldout_windows_are_read_from_the_corpus_once_and_kept(tmp_path, token_file, monkeypatch):
    """The evaluation windows follow the training ones; the first reader keeps them (whole, with
    their digest) and every later one reads that file, not the corpus again."""
    from raysae import activations

    cfg = build_cfg(tmp_path, token_file)
    expected = torch.from_numpy(job_tokens(cfg, cfg.train.eval_tokens, cfg.data.num_tokens)).long()
    both = job_tokens(cfg, cfg.data.num_tokens + cfg.train.eval_tokens)  # one read: the cache's
    assert torch.equal(torch.from_numpy(both[cfg.data.num_tokens // 16:]).long(), expected)
    reads = []
    real = activations.load_rows
    monkeypatch.setattr(activations, "load_rows", lambda *a: reads.append(a) or real(*a))
    first = activations.heldout_tokens(cfg)
    assert torch.equal(first, expected) and first.dtype == torch.int64 and len(reads) == 1
    for _ in range(3):
        assert torch.equal(activations.heldout_tokens(cfg), expected)
    assert len(reads) == 1
    path = activations.heldout_path(cfg)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # other held-out settings: another file, read once more
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_tokens=128))
    assert torch.equal(activations.heldout_tokens(other), expected[:8]) and len(reads) == 2
    # a kept file whose bytes changed is refused, naming it, not used
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"{path}: the held-out windows do not match their digest"):
        activations.heldout_tokens(cfg)
