"""The `raysae` command: check a config, or run a job's stages on the current Ray cluster."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from raysae.activations import check_source, heldout_tokens
from raysae.config import ConfigError, JobConfig, load_config
from raysae.costs import Calibration, PhaseCost, train_costs
from raysae.distributed import init_ray
from raysae.features.tasks import check_task_source
from raysae.models import hook_name, model_dims, parse_hook_name, pretrained_name, validate_sites
from raysae.sources import check_budgets
from raysae.stitching import grid as stitch_grid
from raysae.stitching.probes import check_probe_columns
from raysae.tracking import job_tracking_uri, ui_hint
from raysae.transfer import grid as transfer_grid

log = logging.getLogger("raysae")


TOY_SCHEME = "toy://"
TOY_MEMBERS = ("small", "large", "corpus", "heldout", "tokenizer", "variants", "tasks")


def resolve_toy(cfg: JobConfig) -> JobConfig:
    """Replace `toy://<preset>/<member>` names by the paths of the toy pair, built under
    `<runs_dir>/toy` on first use (a few minutes) and reused after."""

    def resolve(uri: str | None) -> str | None:
        if uri is None or not uri.startswith(TOY_SCHEME):
            return uri
        from raysae.toy import ensure_toy_pair, preset

        name, _, member = uri.removeprefix(TOY_SCHEME).partition("/")
        if member not in TOY_MEMBERS:
            raise ConfigError(f"{uri!r}: expected toy://<preset>/<{'|'.join(TOY_MEMBERS)}>")
        paths = ensure_toy_pair(preset(name), root=Path(cfg.runs_dir) / "toy")
        return str(getattr(paths, member).resolve())

    model = dataclasses.replace(cfg.model, name=resolve(cfg.model.name))
    data = dataclasses.replace(
        cfg.data, source=resolve(cfg.data.source), tokenizer=resolve(cfg.data.tokenizer)
    )
    cfg = dataclasses.replace(cfg, model=model, data=data)
    if cfg.features is not None:
        tasks = tuple(resolve(t) for t in cfg.features.tasks)
        cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, tasks=tasks))
    if cfg.stitch is not None:
        s = cfg.stitch
        large = dataclasses.replace(s.large, name=resolve(s.large.name))
        probes = s.probes and dataclasses.replace(s.probes, source=resolve(s.probes.source))
        cfg = dataclasses.replace(cfg, stitch=dataclasses.replace(
            s, large=large, probes=probes, variants=resolve(s.variants)))
    return cfg


def _load(args: argparse.Namespace) -> JobConfig:
    cfg = load_config(args.config)
    runs_dir = args.runs_dir or os.environ.get("RAYSAE_RUNS_DIR")
    cfg = dataclasses.replace(cfg, runs_dir=str(Path(runs_dir or cfg.runs_dir).resolve()))
    cfg = resolve_toy(cfg)
    # the driver's tracking URI goes with the job to every task and worker: a node's own
    # environment (another MLFLOW_TRACKING_URI, or none) can never send its runs elsewhere
    cfg = dataclasses.replace(cfg, tracking_uri=job_tracking_uri(cfg))
    try:
        check_job(cfg)  # before Ray starts any work
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    return cfg


def check_job(cfg: JobConfig) -> None:
    """The checks that need the models' configs or the file system (the config classes check
    everything else as they load); raises ConfigError naming the field."""
    d_model = validate_sites(cfg.model, cfg.cache.sites, cfg.cache.layers)
    saes = [j.sae for j in transfer_grid.architecture_jobs(cfg)] if cfg.sweep else [cfg.sae]
    if cfg.stitch is None:  # (a stitch job sets the widths: `stitch_grid.validate`)
        why = (f" = sae.expansion_factor {cfg.sae.expansion_factor} x d_model {d_model} of "
               f"{cfg.model.name!r}")
        for sae in saes:  # k above the width, a last Matryoshka width that is not it
            sae.check_width(d_model, why)
    if cfg.sweep is not None:
        transfer_grid.validate(cfg, cfg.sweep, model_dims(cfg.model)[0])
    s = cfg.stitch
    if s is not None:
        stitch_grid.validate(cfg)
        validate_sites(cfg.model, [s.site], s.match_layers, "stitch.match_layers")
        validate_sites(cfg.model, [s.site], [a for a, _ in s.pairs], "stitch.pairs")
        validate_sites(s.large, [s.site], [b for _, b in s.pairs], "stitch.pairs")
    check_budgets(cfg)
    if cfg.features is not None:
        check_feature_counts(cfg, s.widths if s else [sae.width(d_model) for sae in saes])
    for source in cfg.features.tasks if cfg.features else ():
        check_task_source(source)
    if cfg.data.tokenizer:
        pretrained_name(cfg.data.tokenizer, "tokenizer")
    sources = {"data.source": cfg.data.source, "stitch.variants": s and s.variants,
               "stitch.probes.source": s and s.probes and s.probes.source}
    for name, source in sources.items():
        if source:
            check_source(source, name)
    if s is not None and s.probes is not None:
        check_probe_columns(s.probes)


def check_feature_counts(cfg: JobConfig, widths: list[int]) -> None:
    """Circuit sizes given as feature counts must fit every SAE the feature phase reads."""
    assert cfg.features is not None
    for name in ("faithfulness_n", "completeness_n"):
        over = [int(v) for v in getattr(cfg.features, name) if v >= 1 and v > min(widths)]
        if over:
            raise ConfigError(
                f"features.{name}: got feature counts {over}, expected at most the smallest SAE "
                f"width ({min(widths)}, of the widths {sorted(set(widths))}); or give fractions of "
                "d_sae in (0, 1)"
            )


def start_ray(cfg: JobConfig) -> None:
    """Join (or start) Ray, then the preflight on every node, before any work."""
    from raysae.distributed.preflight import preflight

    init_ray()
    nodes = preflight(cfg)
    log.info("preflight: %d node(s) OK: %s", len(nodes), ", ".join(nodes))


def cmd_check(cfg: JobConfig) -> None:
    print(f"{cfg.name}: config OK ({cfg.model.name}, layers {list(cfg.cache.layers)})")


def job_costs(job: JobConfig, cal: Calibration | None = None, slots: int = 1
             ) -> tuple[JobConfig, str, list[PhaseCost]]:
    """The costs of the job's study: the stitch sweep, the layer-transfer sweep, or a plain
    training (here, above the studies: the cost model in `costs` knows none of them)."""
    if job.stitch is not None:
        return stitch_grid.sweep_costs(job, cal, slots)
    if job.sweep is not None:
        return transfer_grid.sweep_costs(job, cal, slots)
    return train_costs(job, cal, slots)


def cmd_plan(cfg: JobConfig, calibrate: bool = True, slots: int = 1,
             target: float | None = None) -> int:
    """Tokens, FLOPs, shard bytes, memory per worker and (calibrated on this machine) wall time
    of every phase, and the activation source; refuses a cache that does not fit on disk.
    With a target: the cheapest scratch/transfer plan from the config's finished sweep."""
    import torch

    from raysae import costs

    if target is not None:  # read from MLflow: no Ray
        from raysae.tracking import Tracker
        from raysae.transfer.pilot import budget_plan_report, sweep_trials

        try:
            trials = sweep_trials(cfg)
            print(budget_plan_report(cfg, target, trials, Tracker.for_job(cfg)))
        except ConfigError as e:
            print(f"raysae: {e}", file=sys.stderr)
            return 2
        return 0

    cal = None
    if calibrate:
        from raysae.distributed.engine import WORKER_CPUS

        device = "cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu"
        # as a training worker runs: Ray gives it torch threads for its whole CPUs, at least 1
        cal = costs.calibrate(cfg, device, threads=None if device == "cuda" else max(1, int(WORKER_CPUS)))
    job, why, phases = job_costs(cfg, cal, slots)
    print(costs.cost_report(job, why, phases, cal))
    return 0


def cmd_cache(cfg: JobConfig) -> None:
    from raysae.distributed.caching import cache_activations

    start_ray(cfg)
    for name, directory in cache_activations(cfg).items():
        print(f"{name}: {directory}")


def cmd_train(cfg: JobConfig) -> int:
    """Train and evaluate one scratch SAE per site of `cache`, all from one activation stream
    (cached first, or streamed: see `raysae plan`)."""
    from raysae.costs import resolve_source
    from raysae.distributed.caching import cache_activations
    from raysae.distributed.training import (
        SAEGroupSpec,
        SAERun,
        group_key,
        train_on_ray,
        training_key,
    )

    cfg, why = resolve_source(cfg, reads=1)
    print(f"activation source: {why}")
    start_ray(cfg)
    shards = None
    if cfg.train.source == "cached":
        shards = {k: str(v) for k, v in cache_activations(cfg).items()}
    else:
        heldout_tokens(cfg)  # read once, here, not by every worker
    hooks = [hook_name(s, i) for i in cfg.cache.layers for s in cfg.cache.sites]
    members = tuple(
        SAERun(key=training_key(cfg, h, None), name=f"L{layer} {site} scratch", hook=h)
        for h, (site, layer) in ((h, parse_hook_name(h)) for h in hooks)
    )
    spec = SAEGroupSpec(key=group_key(members), members=members, source=cfg.train.source,
                        shards=shards)
    results = train_on_ray(cfg, spec)
    for h, m in zip(hooks, members):
        r = results[m.key].metrics
        if results[m.key].error is not None:
            print(f"{h}: FAILED: {results[m.key].error}")
            continue
        print(
            f"{h}: CES {r['eval/ces']:.3f}  EV {r['eval/explained_variance']:.3f}  "
            f"L0 {r['eval/l0']:.1f}  dead {r['eval/dead_fraction']:.3f}  -> {results[m.key].out_dir}"
        )
    print(ui_hint(cfg.runs_dir))
    return 1 if any(r.error for r in results.values()) else 0


def cmd_sweep(cfg: JobConfig) -> int:
    """The layer-transfer sweep of the config's `sweep` section (resumes an interrupted one);
    with `sweep.architectures`, one sweep per architecture, one after the other."""
    from raysae.distributed.transfer_sweep import run_sweep

    start_ray(cfg)
    failed = False
    for job in transfer_grid.architecture_jobs(cfg):
        result = run_sweep(job)
        failed |= bool(result.failed)
        arch = f" ({job.sae.architecture})" if cfg.sweep and cfg.sweep.architectures else ""
        print(f"sweep {cfg.name}{arch}: {len(result.finished)} trials finished, "
              f"{len(result.failed)} not")
        _print_sweep_result(result)
    print(ui_hint(cfg.runs_dir))
    return 1 if failed else 0


def _print_sweep_result(result: Any) -> None:
    for key, why in result.failed.items():
        print(f"  {key}: {why}")
    s = result.summary
    for plan in s["plans"]:
        print(
            f"{plan['direction']} compute plan: {plan['tokens']:,} tokens against "
            f"{s['scratch_everywhere_tokens']:,} for scratch on every layer "
            f"({plan['saved_fraction']:.0%} saved)"
        )
    if "early_stopping" in s:
        e = s["early_stopping"]
        print(f"early stopping: {e['stopped_early']} of {e['transfers']} transfers stopped "
              f"early; {e['tokens']:,} tokens of the {e['budget_tokens']:,} budgeted "
              f"({e['saved_fraction']:.0%} saved)")
    if "budget_plan" in s:
        print(s["budget_plan"])
    if "budget_plan_run" in s:
        print(s["budget_plan_run"]["text"])


def cmd_stitch(cfg: JobConfig) -> int:
    """The model-stitching sweep of the config's `stitch` section (resumes an interrupted one)."""
    from raysae.distributed.stitch_sweep import run_stitch_sweep

    start_ray(cfg)
    result = run_stitch_sweep(cfg)
    print(f"stitch sweep {cfg.name}: {len(result.finished)} trials finished, "
          f"{len(result.failed)} not; pairs {result.summary['pairs']}")
    for key, why in result.failed.items():
        print(f"  {key}: {why}")
    print(ui_hint(cfg.runs_dir))
    return 1 if result.failed else 0


def cmd_dashboard(cfg: JobConfig, sae_dir: str, out: str | None = None) -> int:
    """Static HTML feature pages of a saved SAE, from the config's model and held-out tokens."""
    import torch

    from raysae import activations
    from raysae.features import dashboard
    from raysae.models import load_lm, load_tokenizer
    from raysae.sae import SAE, SAELoadError

    try:
        sae = SAE.load(sae_dir)
        site, layer = parse_hook_name(sae.metadata.hook_name or "(none)")
    except (SAELoadError, ConfigError) as e:
        print(f"raysae: {sae_dir}: {e}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_lm(cfg.model, device)
    tokenizer = load_tokenizer(cfg.model, cfg.data)
    tokens = activations.heldout_tokens(cfg)
    special = activations.special_token_ids(cfg.model, tokenizer)
    stats, fired = dashboard.collect_feature_stats(
        model, sae.to(device), site, layer, tokens, special
    )
    meta = {
        "model": str(cfg.model.name),
        "hook": hook_name(site, layer),
        "checkpoint": str(Path(sae_dir).resolve()),
        "architecture": sae.cfg.architecture,
        "d_sae": str(sae.d_sae),
        "held-out tokens": f"{tokens.numel():,}",
        "alive features": f"{int((fired > 0).sum())} of {sae.d_sae}",
    }
    out_dir = dashboard.write_dashboard(
        stats, Path(out or Path(sae_dir) / "dashboard"), dashboard.token_decoder(tokenizer),
        f"{cfg.name}: {hook_name(site, layer)}", meta,
    )
    print(f"dashboard: {out_dir / 'index.html'}")
    return 0


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "cache": cmd_cache, "train": cmd_train,
            "sweep": cmd_sweep, "stitch": cmd_stitch, "dashboard": cmd_dashboard}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raysae", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("config", help="YAML job config (see jobs/configs/)")
    parser.add_argument("--runs-dir", help="root of all outputs (default: the config's runs_dir)")
    parser.add_argument("--sae", help="dashboard: the saved SAE folder")
    parser.add_argument("--out", help="dashboard: output folder (default: <SAE>/dashboard)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="plan: skip the measurement of this machine (no wall times)")
    parser.add_argument("--slots", type=int, default=1,
                        help="plan: worker groups the cluster runs at once (default 1)")
    parser.add_argument("--target", type=float,
                        help="plan: the cheapest scratch/transfer plan reaching this normalized "
                             "CES on every layer, from the config's finished sweep")
    args = parser.parse_args(argv)
    if args.command == "dashboard" and not args.sae:
        parser.error("dashboard needs --sae SAE_DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = _load(args)
    except (ConfigError, OSError) as e:
        print(f"raysae: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "dashboard":
            return cmd_dashboard(cfg, args.sae, args.out)
        if args.command == "plan":
            return cmd_plan(cfg, not args.no_calibrate, args.slots, args.target)
        return COMMANDS[args.command](cfg) or 0
    except ConfigError as e:  # found late (the preflight, the data itself): named, no traceback
        print(f"raysae: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
