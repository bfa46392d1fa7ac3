"""One sweep declaration -> every trial of the layer-wise transfer study, its phases and tags.

`expand(job, sweep, base)` turns a `SweepConfig` into `Trial`s: a scratch SAE per layer,
the zero-shot matrix (SAE_j evaluated on layer i, diagonal included), transfer trials
SAE_{i<-i+o} for every offset o and fine-tuning budget, and the compute plans of Appendix B.1
(scratch on alternate layers, transfer to the rest: forward, and its mirror backward). Every
trial's key hashes its own fields, the keys of the trials it starts from and a job-level digest,
so the same declaration always yields the same keys and any change of setting yields new ones.
Pure: no ray, no mlflow; the MLflow tags are derived here, and the sweep
(`raysae.distributed.transfer_sweep`) turns the phases into Tune experiments.

The plan's transfers (`sweep.compute_plan_from`). The paper's 10% point is not a run of its
own: its Appendix B.1 reads "a performance increase after fine-tuning on 10% of the training
data" off Figures 3 and 4, the 100M-token checkpoints of its 500M fine-tuning runs (its code
fine-tunes for 500M tokens only, a checkpoint every 100M). So by default (`checkpoint`) a plan
transfer is the checkpoint at the plan's budget of the transfer trial of the same pair, where
the grid has one: no training of its own, the same SAE as the paper's, the same tokens for
B.1's count. It is not what a P-token run gives: with Table 2's schedule the 500M run is at its
constant lr at 100M (its decay starts at 400M) and its L1 warm-up took 25M tokens, while a
100M run spends 5M warming up the L1 and decays its lr over its last 20M. `run` trains that run
(today's behaviour, and the fallback where the grid has no checkpoint at the plan's budget).
With `sweep.stop_at` a transfer trial may stop before the plan's budget and so have no checkpoint
there: the plan's transfers are then runs of their own, as with `run`, keyed apart from a transfer
trial of the same budget (which may stop early), so that they train the whole plan budget.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from raysae.activations import fingerprint
from raysae.config import (
    ComputePlanDirection,
    ConfigError,
    JobConfig,
    SweepConfig,
    TrainConfig,
    digest,
    to_dict,
)
from raysae.costs import (
    Calibration,
    PhaseCost,
    SAECost,
    format_tokens,
    phase_costs,
    resolve_source,
)
from raysae.features.targets import FeatureTarget, SAERef
from raysae.models import hook_name
from raysae.reference import DIRECTION_LABELS

Phase = Literal["scratch", "zeroshot", "transfer", "plan", "budget_plan"]
PHASES: tuple[Phase, ...] = ("scratch", "zeroshot", "transfer", "plan")
"""Phases in dependency order: everything after `scratch` starts from a scratch SAE. The
`budget_plan` phase (`sweep.run_budget_plan`) is not among them: its trials are known only once
the transfers finished (`budget_plan_trials`)."""


@dataclass(frozen=True)
class Trial:
    """One run of the grid: a scratch training, a zero-shot evaluation or a fine-tuning."""

    phase: Phase
    """Which part of the study the trial belongs to."""
    layer: int
    """Target layer: the activations the SAE is trained or evaluated on."""
    source_layer: int | None
    """Layer of the scratch SAE the trial starts from (None for scratch)."""
    direction: str
    """'scratch', 'self' (zero-shot diagonal), 'forward' (offset -1), 'backward' (+1) or
    'offset+2' etc.; runs carry it as its label (`label_of`: 'fwd', 'bwd')."""
    budget: int
    """Training tokens (0 for a zero-shot evaluation)."""
    lr: float | None
    """Peak learning rate (None for a zero-shot evaluation)."""
    key: str
    """Stable identity: MLflow run key, Ray run name seed, dependency reference."""
    name: str
    """Readable run name, e.g. 'L3 scratch', 'L3←L2 fwd', 'L3←L2 fwd 50%' (the direction's label)."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags, one per grid axis (`raysae.phase`, `raysae.layer`, ...)."""
    depends_on: tuple[str, ...] = ()
    """Keys of the trials whose SAE this one starts from."""

    @property
    def trains(self) -> bool:
        """Whether the trial trains an SAE (everything but zero-shot evaluation)."""
        return self.phase != "zeroshot"


def base_digest(job: JobConfig, cache_fingerprint: str) -> str:
    """The job-level part of every trial key: the activations (`activations.fingerprint`),
    the SAE architecture and the training settings."""
    setting = {"cache": cache_fingerprint, "sae": to_dict(job.sae), "train": to_dict(job.train)}
    return digest(setting)


def direction_of(offset: int) -> str:
    """The direction of source = target + offset: `forward` (-1), `backward` (+1), `self` (0)."""
    if offset == 0:
        return "self"
    return {-1: "forward", 1: "backward"}.get(offset, f"offset{offset:+d}")


def label_of(direction: str) -> str:
    """The label runs carry for a direction (tag `raysae.direction`, run names): `fwd`, `bwd`
    (`reference.DIRECTION_LABELS`, the stored values), any other as it is."""
    return DIRECTION_LABELS.get(direction, direction)


def _key(
    base: str,
    site: str,
    kind: str,
    layer: int,
    source: int | None,
    budget: int,
    lr: float | None,
    depends_on: tuple[str, ...],
) -> str:
    # The phase is left out on purpose: a plan trial identical to a transfer trial is the same
    # run, and must get the same key so that it is trained once.
    setting = [base, site, kind, layer, source, budget, lr, list(depends_on)]
    h = digest(setting)
    src = "" if source is None else f"<L{source}"
    return f"{kind}:{site}:L{layer}{src}:{h}"


def _make(
    job: JobConfig,
    sweep: SweepConfig,
    base: str,
    phase: Phase,
    layer: int,
    source: Trial | None,
    budget: int,
    lr: float | None,
    name: str,
) -> Trial:
    """A trial on `layer` starting from the scratch trial `source` (None: a scratch trial)."""
    depends_on = () if source is None else (source.key,)
    src = None if source is None else source.layer
    direction = "scratch" if src is None else direction_of(src - layer)
    kind = "eval" if phase == "zeroshot" else "train"
    if phase in ("plan", "budget_plan") and sweep.stop_at is not None:
        # not the transfer trial of the same budget: that one may stop before it (`compute_plan_checkpoint`);
        # a B.1 plan trial and a budget-plan trial of one setting are the same run
        kind = "plan"
    tags = {
        "raysae.phase": phase,
        "raysae.layer": str(layer),
        "raysae.source_layer": "" if src is None else str(src),
        "raysae.direction": label_of(direction),
        "raysae.budget": str(budget),
        "raysae.architecture": job.sae.architecture,
        "raysae.site": sweep.site,
    }
    key = _key(base, sweep.site, kind, layer, src, budget, lr, depends_on)
    return Trial(phase, layer, src, direction, budget, lr, key, name, tags, depends_on)


def budget_plan_trials(job: JobConfig, sweep: SweepConfig, base: str, trials: list[Trial],
                       transfers: dict[int, tuple[int, int]]) -> list[Trial]:
    """The transfers of a plan for a target (`sweep.run_budget_plan`; target layer -> (source
    layer, tokens)): SAE_{i<-j} trained from the scratch trial of layer j for exactly its planned
    tokens, a run of its own (not a transfer trial, which may stop early)."""
    scratch = {t.layer: t for t in trials if t.phase == "scratch"}
    return [_make(job, sweep, base, "budget_plan", i, scratch[j], n, sweep.finetune_lr,
                  f"L{i}←L{j} {label_of(direction_of(j - i))} plan {format_tokens(n)}")
            for i, (j, n) in sorted(transfers.items())]


def architecture_jobs(job: JobConfig) -> list[JobConfig]:
    """The architecture axis (`sweep.architectures`): one job per architecture, its `sae` set
    to it and the axis removed, each a sweep of its own (trials, keys, parent run and the
    `raysae.architecture` tag; the activations' fingerprint, so the cache, is shared). A job
    without the axis is its own only job."""
    assert job.sweep is not None
    out = []
    for arch in job.sweep.architectures or (job.sae.architecture,):
        try:
            sae = dataclasses.replace(job.sae, architecture=arch)
        except ConfigError as e:
            raise ConfigError(f"sweep.architectures: {arch!r} with this sae section: {e}") from None
        sweep = dataclasses.replace(job.sweep, architectures=())
        out.append(dataclasses.replace(job, sae=sae, sweep=sweep))
    return out


def validate(job: JobConfig, sweep: SweepConfig, n_layers: int | None = None) -> None:
    """Checks that need both the job and the sweep (and the model's depth `n_layers`, when
    known); raise ConfigError naming the field."""
    if sweep.architectures:
        architecture_jobs(dataclasses.replace(job, sweep=sweep))
    missing = [i for i in sweep.layers if i not in job.cache.layers]
    if missing:
        depth = "" if n_layers is None else f"; {job.model.name!r} has {n_layers} blocks (0..{n_layers - 1})"
        raise ConfigError(
            f"sweep.layers: layer {missing[0]} is not cached: expected layers of cache.layers "
            f"{list(job.cache.layers)}{depth}"
        )
    if sweep.site not in job.cache.sites:
        raise ConfigError(
            f"sweep.site: got {sweep.site!r}, expected one of cache.sites {list(job.cache.sites)}"
        )
    layers = set(sweep.layers)
    for o in sweep.offsets:
        if not any(i + o in layers for i in layers):
            raise ConfigError(
                f"sweep.offsets: offset {o} pairs no two of sweep.layers {list(sweep.layers)}"
            )
    small = [b for b in sweep.finetune_budgets if b < job.train.batch_size]
    if small:
        raise ConfigError(
            f"sweep.finetune_budgets: got {small}, expected budgets >= train.batch_size "
            f"({job.train.batch_size})"
        )
    if sweep.compute_plan and compute_plan_budget(job, sweep) < job.train.batch_size:
        raise ConfigError(
            f"sweep.compute_plan_budget_fraction: got {sweep.compute_plan_budget_fraction}, "
            f"which leaves {compute_plan_budget(job, sweep)} tokens, below train.batch_size "
            f"({job.train.batch_size})"
        )


def compute_plan_budget(job: JobConfig, sweep: SweepConfig) -> int:
    """Tokens of each transfer trial of the compute plan."""
    return round(sweep.compute_plan_budget_fraction * job.train.num_tokens)


def compute_plan_pairs(
    sweep: SweepConfig, direction: ComputePlanDirection = "forward"
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """One compute plan of Appendix B.1: (scratch layers, (target, source) pairs), sorted.
    Forward: scratch on the 1st, 3rd, ... layer of the sweep, every other layer from the one
    before it (SAE_{i<-i-1}); backward, the mirror: scratch on the last, 3rd-last, ... layer,
    every other layer from the one after it (SAE_{i<-i+1}). On the paper's 12 layers: scratch on
    0, 2, ..., 10 with 1<-0, ..., 11<-10, and scratch on 1, 3, ..., 11 with 0<-1, ..., 10<-11."""
    layers = sweep.layers if direction == "forward" else sweep.layers[::-1]
    pairs = ((layers[k], layers[k - 1]) for k in range(1, len(layers), 2))
    return tuple(sorted(layers[::2])), tuple(sorted(pairs))


def compute_plan_checkpoint(
    job: JobConfig, sweep: SweepConfig, trials: list[Trial], target: int, source: int
) -> Trial | None:
    """The transfer trial whose checkpoint at the plan's budget P is the plan's
    SAE_{target<-source} (`compute_plan_from: checkpoint`): the same pair and lr, the smallest
    budget that ends at P or checkpoints at P (P a multiple of `train.checkpoint_every_tokens`).
    None where there is none, or with `compute_plan_from: run`: the plan trains a run. None too
    with `sweep.stop_at`: a transfer trial may stop before P, so no checkpoint of it is sure to
    be there, and the plan's transfers are trained runs of their own."""
    if sweep.compute_plan_from != "checkpoint" or sweep.stop_at is not None:
        return None
    P, every = compute_plan_budget(job, sweep), job.train.checkpoint_every_tokens
    fits = [t for t in trials if t.phase == "transfer" and t.layer == target
            and t.source_layer == source and t.lr == sweep.finetune_lr
            and (t.budget == P or (t.budget > P and P % every == 0))]
    return min(fits, key=lambda t: t.budget, default=None)


def expand(job: JobConfig, sweep: SweepConfig, base: str) -> list[Trial]:
    """Every trial of the sweep, in phase order (see `PHASES`)."""
    validate(job, sweep)
    S, tc = job.train.num_tokens, job.train
    many = len(sweep.finetune_budgets) > 1
    make = functools.partial(_make, job, sweep, base)

    scratch = {i: make("scratch", i, None, S, tc.lr, f"L{i} scratch") for i in sweep.layers}
    trials = list(scratch.values())

    for i in sweep.layers:
        for j in sweep.layers:
            trials.append(make("zeroshot", i, scratch[j], 0, None, f"L{i}←L{j} zero-shot"))

    for i in sweep.layers:
        for o in sweep.offsets:
            if i + o not in scratch:
                continue
            for b in sweep.finetune_budgets:
                name = f"L{i}←L{i + o} {label_of(direction_of(o))}" + (f" {format_tokens(b)}" if many else "")
                trials.append(make("transfer", i, scratch[i + o], b, sweep.finetune_lr, name))

    if sweep.compute_plan:
        seen = {t.key for t in trials}
        budget = compute_plan_budget(job, sweep)
        pct = f"{sweep.compute_plan_budget_fraction * 100:g}%"
        transfers = list(trials)
        for direction in sweep.compute_plan_directions:
            for i, s in compute_plan_pairs(sweep, direction)[1]:
                if compute_plan_checkpoint(job, sweep, transfers, i, s) is not None:
                    continue  # read at a transfer trial's checkpoint: nothing to train
                name = f"L{i}←L{s} {label_of(direction_of(s - i))} {pct}"
                t = make("plan", i, scratch[s], budget, sweep.finetune_lr, name)
                if t.key not in seen:
                    trials.append(t)
                    seen.add(t.key)
    return trials


def phases(trials: list[Trial]) -> dict[str, list[Trial]]:
    """Trials grouped by phase, in dependency order; every dependency must sit in an earlier
    phase (ValueError otherwise), so running the phases in order never waits on a later one."""
    out: dict[str, list[Trial]] = {p: [] for p in PHASES}
    for t in trials:
        out[t.phase].append(t)
    done: set[str] = set()
    for p in PHASES:
        for t in out[p]:
            late = [k for k in t.depends_on if k not in done]
            if late:
                raise ValueError(
                    f"trial {t.name!r} ({p}) depends on {late}, not in an earlier phase"
                )
        done.update(t.key for t in out[p])
    return out


def train_config_for(job: JobConfig, trial: Trial) -> TrainConfig:
    """The job's training settings with the trial's budget and learning rate."""
    if not trial.trains or trial.lr is None:
        raise ValueError(f"trial {trial.name!r} is an evaluation, it has no training config")
    return job.sae_settings(num_tokens=trial.budget, lr=trial.lr)[1]


def compute_plan_summary(job: JobConfig, sweep: SweepConfig, trials: list[Trial]) -> dict[str, Any]:
    """Total training tokens of each compute plan (`sweep.compute_plan_directions`) against
    scratch on every layer (Appendix B.1), with its members: the trial (key) and the tokens at
    which its SAE is read (a scratch SAE at its budget; a plan transfer at the plan's budget,
    of the transfer trial whose checkpoint it is, or of its own run; a plan trial that
    duplicates a transfer trial is that transfer trial, but with `sweep.stop_at`, where it is a
    run of its own). Members not in `trials` are left out."""
    S, budget = job.train.num_tokens, compute_plan_budget(job, sweep)
    # a plan trial of its own (`sweep.stop_at`) over the transfer trial of the same setting
    index = {(t.layer, t.source_layer, t.budget, t.lr): t.key
             for t in sorted(trials, key=lambda t: t.phase == "plan") if t.trains}
    everywhere = S * len(sweep.layers)
    plans = []
    for direction in sweep.compute_plan_directions:
        scratch_layers, pairs = compute_plan_pairs(sweep, direction)
        members = [{"key": index.get((i, None, S, job.train.lr)), "layer": i, "tokens": S,
                    "from": "scratch"} for i in scratch_layers]
        for i, s in pairs:
            ckpt = compute_plan_checkpoint(job, sweep, trials, i, s)
            key = ckpt.key if ckpt else index.get((i, s, budget, sweep.finetune_lr))
            members.append({"key": key, "layer": i, "tokens": budget,
                            "from": "checkpoint" if ckpt and ckpt.budget > budget else "run"})
        tokens = S * len(scratch_layers) + budget * len(pairs)
        plans.append({
            "direction": direction,
            "scratch_layers": list(scratch_layers),
            "transfers": [list(p) for p in pairs],
            "tokens": tokens,
            "saved_fraction": 1 - tokens / everywhere,
            "members": [m for m in members if m["key"] is not None],
        })
    return {
        "scratch_everywhere_tokens": everywhere,
        "compute_plan_budget": budget,
        "plan_budget_fraction": sweep.compute_plan_budget_fraction,
        "plan_from": sweep.compute_plan_from,
        "plans": plans,
    }


def sae_costs(job: JobConfig, trials: list[Trial]) -> dict[str, list[SAECost]]:
    """The SAE trainings of each training phase, for `raysae.costs`."""
    assert job.sweep is not None
    saes = [j.sae for j in architecture_jobs(job)]  # every architecture runs the same grid
    return {
        phase: [SAECost(job.model, hook_name(job.sweep.site, t.layer), sae, t.budget)
                for t in trials if t.phase == phase for sae in saes]
        for phase in PHASES if phase != "zeroshot"
    }


def sweep_costs(job: JobConfig, cal: Calibration | None = None, slots: int = 1
         ) -> tuple[JobConfig, str, list[PhaseCost]]:
    """The sweep's costs: the job with its activation source decided (each training phase reads
    the activations once), why, and the cost of every phase."""
    assert job.sweep is not None
    trials = expand(job, job.sweep, base_digest(job, fingerprint(job)))
    saes = sae_costs(job, trials)
    job, why = resolve_source(job, reads=sum(1 for v in saes.values() if v), cal=cal)
    return job, why, phase_costs(job, saes, cal, slots)


# ---------------------------------------------------------------------------------------------
# Lookups: a transfer's references


class References(NamedTuple):
    """Where a transfer SAE_{i<-j} is measured against: the scratch SAE of layer i (normalized
    CES 1) and SAE_j read zero-shot on layer i (normalized CES 0), by trial key."""

    scratch: dict[int, str]
    """Target layer -> the key of its scratch trial."""
    zero_shot: dict[tuple[int, int], str]
    """(target layer, source layer) -> the key of the source's zero-shot trial there."""

    def of(self, trial: Trial) -> tuple[str | None, str | None]:
        """(the key of the scratch trial of the trial's layer, the key of its source read
        zero-shot there); None where the grid has none."""
        return (self.scratch.get(trial.layer),
                self.zero_shot.get((trial.layer, trial.source_layer)))  # type: ignore[arg-type]


def references(trials: Iterable[Trial]) -> References:
    """The scratch and zero-shot trials of `trials`, by where they are read."""
    scratch: dict[int, str] = {}
    zero_shot: dict[tuple[int, int], str] = {}
    for t in trials:
        if t.phase == "scratch":
            scratch[t.layer] = t.key
        elif t.phase == "zeroshot":
            zero_shot[(t.layer, t.source_layer)] = t.key  # type: ignore[index]
    return References(scratch, zero_shot)


def feature_targets(trials: list[Trial]) -> list[FeatureTarget]:
    """The feature phase's targets: one per trained SAE of `trials`; a scratch SAE is compared
    with the SAEs transferred from it (the largest budget per direction), the paper's Figure 23."""
    targets = []
    for t in trials:
        children: dict[str, Trial] = {}
        for c in trials:
            if c.phase == "transfer" and c.depends_on == (t.key,):
                best = children.get(c.direction)
                if best is None or c.budget > best.budget:
                    children[c.direction] = c
        compare = tuple(SAERef(c.name, c.key, c.layer) for c in children.values())
        targets.append(FeatureTarget(t.key, t.name, t.layer, compare=compare))
    return targets
