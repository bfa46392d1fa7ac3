"""The `raysae` command: check a config, or run a job's stages on the current Ray cluster."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from raysae.config import ConfigError, JobConfig, load_config
from raysae.models import parse_hook_name, validate_sites
from raysae.tracking import tracking_uri

log = logging.getLogger("raysae")


def _load(args: argparse.Namespace) -> JobConfig:
    cfg = load_config(args.config)
    runs_dir = args.runs_dir or os.environ.get("RAYSAE_RUNS_DIR")
    if runs_dir:
        cfg = dataclasses.replace(cfg, runs_dir=str(Path(runs_dir).resolve()))
    validate_sites(cfg.model, cfg.cache.sites, cfg.cache.layers)  # before Ray starts any work
    return cfg


def _init_ray() -> None:
    import ray

    # Under `ray job submit` (or after `ray start`) this joins that cluster; otherwise it starts
    # a local one whose dashboard listens on 127.0.0.1 only.
    ray.init(dashboard_host="127.0.0.1", log_to_driver=True)


def cmd_check(cfg: JobConfig) -> None:
    print(f"{cfg.name}: config OK ({cfg.model.name}, layers {list(cfg.cache.layers)})")


def cmd_cache(cfg: JobConfig) -> None:
    from raysae.distributed.caching import cache_activations

    _init_ray()
    for name, directory in cache_activations(cfg).items():
        print(f"{name}: {directory}")


def cmd_train(cfg: JobConfig) -> None:
    """Cache, then train and evaluate one scratch SAE per cached site, one after another."""
    from raysae.distributed.caching import cache_activations
    from raysae.distributed.training import TrainSpec, train_on_ray, training_key

    _init_ray()
    for hook, directory in cache_activations(cfg).items():
        site, layer = parse_hook_name(hook)
        spec = TrainSpec(
            key=training_key(cfg, hook, None),
            name=f"L{layer} {site} scratch",
            shards_dir=str(directory),
            tags={"raysae.layer": str(layer), "raysae.init": "scratch"},
        )
        result = train_on_ray(cfg, spec)
        m = result.metrics
        print(
            f"{hook}: CES {m['eval/ces']:.3f}  EV {m['eval/explained_variance']:.3f}  "
            f"L0 {m['eval/l0']:.1f}  dead {m['eval/dead_fraction']:.3f}  -> {result.sae_dir}"
        )
    print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri(cfg.runs_dir)}")


COMMANDS = {"check": cmd_check, "cache": cmd_cache, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raysae", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("config", help="YAML job config (see jobs/configs/)")
    parser.add_argument("--runs-dir", help="root of all outputs (default: the config's runs_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = _load(args)
    except (ConfigError, OSError) as e:
        print(f"raysae: {e}", file=sys.stderr)
        return 2
    COMMANDS[args.command](cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
