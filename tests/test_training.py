"""Ray Train end to end: real data parallelism, MLflow logging, and recovery from a killed worker."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import chaos
import pytest
import ray.cloudpickle
import torch
from chaos import row_digest, traced, worker_shards
from conftest import build_cfg
from mlflow.tracking import MlflowClient

from raysae import shards
from raysae.config import CacheConfig, DataConfig, SAEConfig, TrainConfig
from raysae.sae import SAE
from raysae.tracking import RUN_KEY_TAG, tracking_uri

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(chaos)  # the traced fit runs on the Train workers

BUDGET = 8192


@pytest.fixture(scope="module")
def job(ray_local, tmp_path_factory, token_file):
    from raysae.distributed.caching import cache_activations

    tmp = tmp_path_factory.mktemp("train")
    cfg = build_cfg(tmp, token_file)
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(source=str(token_file), context_length=16, num_tokens=1024),
        cache=CacheConfig(layers=(1,), shard_tokens=128, out_dir=str(tmp / "acts")),
        sae=SAEConfig(architecture="relu", expansion_factor=4, l1_coefficient=1e-3),
        train=TrainConfig(num_tokens=BUDGET, batch_size=256, lr=3e-3, checkpoint_every_tokens=2048,
                          eval_tokens=128, num_workers=2, log_every_steps=4, lr_warmup_frac=0.0,
                          lr_decay_frac=0.0, l1_warmup_frac=0.0, data_passes=10),
    )
    dirs = cache_activations(cfg)
    return cfg, dirs["blocks.1.hook_resid_post"]


def spec(directory, key):
    """A group of one SAE on the cached layer."""
    from raysae.distributed.training import SAEGroupSpec, SAERun

    hook = "blocks.1.hook_resid_post"
    member = SAERun(key=key, name=key, hook=hook, tags={"raysae.layer": "1"})
    return SAEGroupSpec(key=key, members=(member,), source="cached", shards={hook: str(directory)})


def shard_rows(directory, files):
    reader = shards.ActivationReader(directory)
    infos = [s for s in reader.manifest.shards if s.file in files]
    rows = set()
    for info in infos:
        for r in reader.vectors(reader.read_shard(info)):
            rows.add(row_digest(r))
    return rows


def mlflow_run(cfg, key):
    client = MlflowClient(tracking_uri(cfg.runs_dir))
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, f"expected exactly one MLflow run for {key}, found {len(runs)}"
    return client, runs[0]


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    from raysae.distributed.engine import fit_on_ray

    cfg, directory = job
    debug = tmp_path_factory.mktemp("debug")
    return fit_on_ray(cfg, spec(directory, "plain"), traced(str(debug)))["plain"], debug


def test_data_parallel_training_lowers_loss_and_logs(job, uninterrupted):
    cfg, directory = job
    result, debug = uninterrupted
    ranks = [json.loads((debug / f"rank{r}-from0.json").read_text()) for r in (0, 1)]
    shards_of = [worker_shards(directory, r, 2) for r in (0, 1)]
    # the same SAE on both workers before every step and at the end
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == BUDGET // 256
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert a["params_before"] == b["params_before"]
    assert ranks[0]["final"] == ranks[1]["final"]
    # disjoint data: each worker's shards are its own, and it only saw rows from them
    assert not set(shards_of[0]) & set(shards_of[1])
    for r, own in zip(ranks, shards_of):
        seen = {row for s in r["steps"] for row in s["rows"]}
        assert seen <= shard_rows(directory, own)
        assert sum(len(s["rows"]) for s in r["steps"]) == BUDGET // 2

    client, run = mlflow_run(cfg, "plain")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_tokens"] == str(BUDGET)
    assert run.data.tags["raysae.layer"] == "1" and run.data.tags["raysae.tokens_seen"] == str(BUDGET)
    mse = client.get_metric_history(run.info.run_id, "train/mse")
    assert mse[-1].step == BUDGET and mse[-1].value < 0.5 * mse[0].value
    ev = client.get_metric_history(run.info.run_id, "eval/explained_variance")
    assert [m.step for m in ev] == [2048, 4096, 6144, 8192]  # metrics at every checkpoint
    assert ev[-1].value > 0.5
    assert {a.path for a in client.list_artifacts(run.info.run_id, "sae")} == {
        "sae/cfg.json", "sae/sae_weights.safetensors"}
    assert SAE.load(result.out_dir).d_sae == 256
    assert result.run_id == run.info.run_id


def test_killed_worker_resumes_from_checkpoint_with_exact_budget(job, uninterrupted, tmp_path):
    from raysae.distributed.engine import fit_on_ray

    cfg, directory = job
    marker = tmp_path / "killed"
    debug = tmp_path / "debug"
    fit = traced(str(debug), kill_at_tokens=5000, marker=str(marker), kill_rank=1)
    result = fit_on_ray(cfg, spec(directory, "killed"), fit)["killed"]
    assert marker.exists()  # the worker really died once
    # the second attempt started from the 4096-token checkpoint, not from scratch
    resumed = {p.name for p in debug.iterdir()}
    assert resumed == {"rank0-from16.json", "rank1-from16.json"}
    steps = json.loads((debug / "rank0-from16.json").read_text())["steps"]
    assert (16 + len(steps)) * 256 == BUDGET
    client, run = mlflow_run(cfg, "killed")  # one MLflow run, continued
    assert run.info.status == "FINISHED"
    tokens = [m.step for m in client.get_metric_history(run.info.run_id, "tokens_seen")]
    assert max(tokens) == BUDGET
    # identical to the uninterrupted run: same data order, same optimiser state
    plain, _ = uninterrupted
    a, b = SAE.load(plain.out_dir), SAE.load(result.out_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() < 1e-6, name


def test_rerun_of_finished_training_is_reused(job, uninterrupted):
    from raysae.distributed.training import train_on_ray

    cfg, directory = job
    plain, _ = uninterrupted
    again = train_on_ray(cfg, spec(directory, "plain"))["plain"]
    assert again.run_id == plain.run_id
    assert again.metrics["tokens_seen"] == BUDGET
    mlflow_run(cfg, "plain")


def group(directory, *members, source="cached"):
    from raysae.distributed.training import SAEGroupSpec, group_key

    shards = {m.hook: str(directory) for m in members} if source == "cached" else None
    return SAEGroupSpec(key=group_key(members), members=members, source=source, shards=shards)


@pytest.fixture(scope="module")
def shared(job):
    """One group of seven SAEs on one stream, two workers, one Ray Train run: each test below
    reads its own members (a group's members are independent, so they can share it)."""
    from raysae.distributed.training import SAERun, train_on_ray
    from raysae.stopping import StopRule

    cfg, directory = job
    hook = "blocks.1.hook_resid_post"
    members = {
        "twin": SAERun(key="twin", name="twin", hook=hook),  # the settings of the solo "plain" run
        "short": SAERun(key="short", name="short", hook=hook, num_tokens=BUDGET // 2, lr=1e-3),
        "steady": SAERun(key="steady", name="steady", hook=hook),
        "wild": SAERun(key="wild", name="wild", hook=hook, lr=1e30),
        "keeps": SAERun(key="keeps", name="keeps", hook=hook),
        "stops": SAERun(key="stops", name="stops", hook=hook,
                        stop=StopRule("eval/ces", -1e9, "any CES", every_tokens=1024)),
        "never": SAERun(key="never", name="never", hook=hook,
                        stop=StopRule("eval/ces", 1e9, "an unreachable CES", every_tokens=1024)),
    }
    return members, train_on_ray(cfg, group(directory, *members.values()))


def test_group_members_share_one_stream_and_keep_their_own_runs(job, uninterrupted, shared):
    from raysae.distributed.training import checkpoint_saes

    cfg, directory = job
    hook = "blocks.1.hook_resid_post"
    _, results = shared
    # one stream, each member exactly what it would be alone: the twin equals the solo run
    plain, _ = uninterrupted
    a, b = SAE.load(plain.out_dir), SAE.load(results["twin"].out_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() < 1e-6, name
    # each member its own budget, MLflow run, checkpoints and final SAE
    assert results["short"].metrics["tokens_seen"] == BUDGET // 2
    client, run = mlflow_run(cfg, "short")
    assert run.info.status == "FINISHED" and run.data.params["train.num_tokens"] == str(BUDGET // 2)
    assert run.data.params["train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ces")] == [2048, 4096]
    assert [t for t, _ in checkpoint_saes(cfg, "short")] == [2048, 4096]
    assert [t for t, _ in checkpoint_saes(cfg, "twin")] == [2048, 4096, 6144, 8192]
    assert results["short"].out_dir != results["twin"].out_dir
    assert SAE.load(results["short"].out_dir).metadata.hook_name == hook


def test_streamed_training_equals_cached_training(job):
    """With shuffling off, the same tokens in the same order: the SAE trained on the LM's own
    forward (nothing cached) equals the one trained on the shards."""
    from raysae.distributed.training import SAERun, train_on_ray

    cfg, directory = job
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, shuffle=False,
                                                             num_tokens=BUDGET // 2))
    hook = "blocks.1.hook_resid_post"
    cached = train_on_ray(cfg, group(directory, SAERun(key="in-order", name="c", hook=hook)))
    streamed = train_on_ray(cfg, group(directory, SAERun(key="in-order-streamed", name="s", hook=hook),
                                       source="streamed"))
    a, b = SAE.load(cached["in-order"].out_dir), SAE.load(streamed["in-order-streamed"].out_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    _, run = mlflow_run(cfg, "in-order-streamed")
    assert run.data.tags["raysae.source"] == "streamed"


def test_a_budget_beyond_the_data_is_refused_before_any_work(job):
    from raysae.config import ConfigError
    from raysae.distributed.training import SAERun, train_on_ray

    cfg, directory = job
    once = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data_passes=1))
    member = SAERun(key="too-long", name="x", hook="blocks.1.hook_resid_post")
    with pytest.raises(ConfigError, match=r"budget of 8,192 tokens, but the cached data gives "
                                          r"768 in 1 pass.*train.data_passes"):
        train_on_ray(once, group(directory, member))
    assert not list((Path(cfg.runs_dir).resolve() / "ray_train").glob("too-long*"))


def test_a_diverged_member_fails_alone_and_its_group_goes_on(job, shared):
    """An SAE whose learning rate makes it diverge stops at the first check after the bad step,
    on both workers at once; its run is FAILED with the cause (run, step, tokens), no checkpoint
    of it holds a non-finite value, and the SAE sharing its stream finishes at its budget."""
    from raysae.distributed.engine import ERROR_TAG
    from raysae.distributed.training import checkpoint_saes

    cfg, _ = job
    _, results = shared
    assert results["wild"].error is not None
    assert results["wild"].error.startswith("wild: training diverged: non-finite loss or gradient at step")
    assert results["steady"].error is None and results["steady"].metrics["tokens_seen"] == BUDGET
    _, run = mlflow_run(cfg, "wild")
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG] == results["wild"].error
    _, run = mlflow_run(cfg, "steady")
    assert run.info.status == "FINISHED"
    assert [t for t, _ in checkpoint_saes(cfg, "steady")] == [2048, 4096, 6144, 8192]
    for _, folder in checkpoint_saes(cfg, "wild"):
        sae = SAE.load(folder)
        assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_a_member_that_reaches_its_target_leaves_the_group(job, uninterrupted, shared):
    """Three SAEs of the shared group, two workers: one whose target holds at its first check stops
    there (between checkpoints), one whose target never holds runs its budget checked every
    1,024 tokens and says so, one without a rule equals the solo run: the stop decision (taken
    on rank 0, which evaluates) reached both workers at the same step. The stopped one, gone on
    from its kept state without a rule, ends equal to the solo run."""
    from raysae.distributed.engine import STOP_TAG
    from raysae.distributed.training import SAERun, checkpoint_saes, train_on_ray

    cfg, directory = job
    hook = "blocks.1.hook_resid_post"
    members, results = shared
    stops = members["stops"]
    assert results["stops"].metrics["tokens_seen"] == 1024
    client, run = mlflow_run(cfg, "stops")
    assert run.info.status == "FINISHED" and run.data.tags["raysae.tokens_seen"] == "1024"
    assert run.data.tags[STOP_TAG].startswith("target: eval/ces ") and "at 1,024 tokens" in run.data.tags[STOP_TAG]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ces")] == [1024]
    [(tokens, folder)] = checkpoint_saes(cfg, "stops")
    final, at_stop = SAE.load(results["stops"].out_dir), SAE.load(folder)
    assert tokens == 1024 and torch.equal(final.W_dec, at_stop.W_dec)

    client, run = mlflow_run(cfg, "never")
    assert run.data.tags[STOP_TAG] == ("budget: eval/ces >= 1e+09 (an unreachable CES) not reached "
                                       "in 8,192 tokens")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/ces")]
    assert steps == list(range(1024, BUDGET + 1, 1024))
    assert [t for t, _ in checkpoint_saes(cfg, "never")] == steps
    assert STOP_TAG not in mlflow_run(cfg, "keeps")[1].data.tags
    plain, _ = uninterrupted
    a, b = SAE.load(plain.out_dir), SAE.load(results["keeps"].out_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() < 1e-6, name

    # the stopped SAE goes on from the state kept at its stop (a sweep whose target was raised):
    # its group's stream starts at that step, and it ends where the uninterrupted run ended
    from raysae.distributed.engine import STOP_RULE_TAG, stop_state_dir

    goes_on = dataclasses.replace(stops, stop=None,
                                  resume_from=str(stop_state_dir(cfg, "stops", 1024)))
    result = train_on_ray(cfg, dataclasses.replace(group(directory, goes_on), key="stops-on"))
    assert result["stops"].metrics["tokens_seen"] == BUDGET
    client, run = mlflow_run(cfg, "stops")  # the same run, gone on
    assert run.data.tags[STOP_RULE_TAG] == "none"
    assert run.data.tags[STOP_TAG] == "budget: no stop rule, the budget of 8,192 tokens ran"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/ces")]
    assert steps == [1024, *range(2048, BUDGET + 1, 2048)]  # each once: the check, then checkpoints
    b = SAE.load(result["stops"].out_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() < 1e-6, name
    # a group shares one stream: a member going on from step 4 cannot share it with a fresh one
    fresh = SAERun(key="fresh", name="fresh", hook=hook)
    with pytest.raises(ValueError, match=r"members go on from steps \{'stops': 4\}; a group shares"):
        train_on_ray(cfg, dataclasses.replace(group(directory, goes_on, fresh), key="mixed"))


def faulty_phase(cfg, directory, name, fault, *members):
    """A phase of one group of `members` with `fault` planted, through `run_groups`."""
    from raysae.config import to_dict
    from raysae.distributed.engine import run_groups
    from raysae.distributed.training import members_of, regroup

    spec = group(directory, *members)
    extra = {"job": to_dict(cfg), "max_failures": 0, "fault": fault}
    return run_groups(cfg, name, {spec.key: spec}, chaos.faulty_group, extra, 0, members_of, regroup)


def test_a_storage_error_fails_the_group_whole_and_is_never_split(job):
    from raysae.distributed.training import SAERun

    cfg, directory = job
    hook = "blocks.1.hook_resid_post"
    members = [SAERun(key=f"disk-{i}", name=f"disk {i}", hook=hook, num_tokens=BUDGET // 2)
               for i in (1, 2)]
    done, errors = faulty_phase(cfg, directory, "faults-disk", chaos.Fault("storage", 1024), *members)
    assert done == {} and set(errors) == {"disk-1", "disk-2"}
    for e in errors.values():
        assert e.startswith("failed: [storage] ") and "No space left on device" in e, e
    tune = Path(cfg.runs_dir) / "tune"
    assert (tune / "faults-disk").is_dir() and not list(tune.glob("faults-disk-retry*"))


def test_an_out_of_memory_group_is_replanned_smaller_and_completes(job):
    """A group of three that does not fit (one member's step runs out of memory while its group
    holds more than two) is halved: a group of two and a group of one, every member kept, each
    at its exact budget; no third round."""
    from raysae.distributed.engine.tags import GROUP_TAG
    from raysae.distributed.training import SAERun, group_key

    cfg, directory = job
    hook = "blocks.1.hook_resid_post"
    members = [SAERun(key=f"oom-{i}", name=f"oom {i}", hook=hook, num_tokens=BUDGET // 2)
               for i in (1, 2, 3)]
    done, errors = faulty_phase(cfg, directory, "faults-oom", chaos.Fault("oom", member="oom-1", fits=2),
                                *members)
    assert errors == {} and set(done) == {"oom-1", "oom-2", "oom-3"}
    tune = Path(cfg.runs_dir) / "tune"
    assert (tune / "faults-oom-retry1").is_dir() and not (tune / "faults-oom-retry2").exists()
    pair = group_key(members[:2])
    for key, trained_in in (("oom-1", pair), ("oom-2", pair), ("oom-3", "oom-3")):
        _, run = mlflow_run(cfg, key)
        assert run.info.status == "FINISHED" and run.data.tags["raysae.tokens_seen"] == str(BUDGET // 2)
        assert run.data.tags[GROUP_TAG] == trained_in, (key, run.data.tags[GROUP_TAG])