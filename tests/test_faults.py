"""Failures told apart (`raysae.distributed.engine.faults`): each root cause gets its kind, and
only a member's own fault or an out-of-memory splits its group."""

from __future__ import annotations

import pytest

from raysae.config import ConfigError
from raysae.distributed.engine.faults import fault_kind, parts, retry_plan

CAUSES = {
    "raysae.shards.ShardError: /r/shard-0.arrow is corrupted: sha256 abc != def": "member",
    "ValueError: site blocks.9.hook_resid_post is not in the model": "member",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB": "out-of-memory",
    "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.": "out-of-memory",
    "OSError: [Errno 28] No space left on device": "storage",
    "PermissionError: [Errno 13] Permission denied: '/mnt/raysae/runs/ray_train'": "storage",
    "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL": "storage",
    "mlflow.exceptions.MlflowException: API request to http://head:5000 failed": "tracking",
    "RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1191, unhandled system error": "network",
    "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.": "network",
    "raysae.config.ConfigError: train.num_tokens: a budget of 8,192 tokens, but ...": "config",
}


@pytest.mark.parametrize(("cause", "kind"), CAUSES.items())
def test_each_root_cause_gets_its_kind(cause, kind):
    assert fault_kind(cause) == kind


def test_only_a_members_fault_or_out_of_memory_splits_its_group():
    groups = {"g-shard": ["a", "b"], "g-oom": ["c", "d"], "g-disk": ["e", "f"],
              "g-net": ["g", "h"], "g-one": ["i"], "g-div": ["j", "k"]}
    errors = {
        "a": "failed: raysae.shards.ShardError: shard-0.arrow is corrupted",
        "b": "failed: raysae.shards.ShardError: shard-0.arrow is corrupted",
        "c": "failed: torch.OutOfMemoryError: CUDA out of memory",
        "d": "failed: torch.OutOfMemoryError: CUDA out of memory",
        "e": "failed: OSError: [Errno 28] No space left on device",
        "f": "failed: OSError: [Errno 28] No space left on device",
        "g": "failed: RuntimeError: NCCL error",
        "h": "failed: RuntimeError: NCCL error",
        "i": "failed: raysae.shards.ShardError: corrupted",  # alone already: nothing to split
        "j": "diverged: j: training diverged: non-finite loss",  # left its group, which went on
    }
    split, labelled = retry_plan("p", errors, groups, "diverged")
    # never the disk's or the network's: retried whole
    assert split == {"g-shard": "member", "g-oom": "out-of-memory"}
    assert labelled["e"] == "failed: [storage] OSError: [Errno 28] No space left on device"
    assert labelled["g"] == "failed: [network] RuntimeError: NCCL error"
    assert labelled["c"].startswith("failed: [out-of-memory] ")
    assert labelled["a"].startswith("failed: [member] ")
    assert labelled["j"] == errors["j"]  # a divergence is as before, not retried


def test_an_out_of_memory_group_is_halved_and_a_members_fault_split_one_per_group():
    for n in range(2, 12):
        halves = parts(n, "out-of-memory")
        assert len(halves) == 2 and sorted(i for h in halves for i in h) == list(range(n))
        assert all(len(h) in (n // 2, (n + 1) // 2) for h in halves)
        assert parts(n, "member") == [[i] for i in range(n)]
    # halving again ends at one member per group: ceil(log2 n) rounds at most
    sizes, rounds = [11], 0
    while any(s > 1 for s in sizes):
        sizes = [len(h) for s in sizes if s > 1 for h in parts(s, "out-of-memory")] + [s for s in sizes if s == 1]
        rounds += 1
    assert rounds == 4 and sorted(sizes) == [1] * 11


def test_a_misconfiguration_found_late_stops_the_sweep_and_names_it():
    errors = {"a": "failed: raysae.config.ConfigError: stitch.num_tokens: a budget of 4,096"}
    with pytest.raises(ConfigError, match=r"p: a misconfiguration found while training a, the "
                                          r"sweep stops: failed: .*stitch.num_tokens"):
        retry_plan("p", errors, {"g": ["a", "b"]}, "diverged")
