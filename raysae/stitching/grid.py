"""One stitch declaration -> every trial of the model-stitching study, its phases and tags.

For each stitch pair (A layer, B layer) of the `stitch` section: the stitch itself; an SAE on A
per width (the job's scratch budget); an SAE on B from scratch per width and budget; A's SAE
carried to B through the stitch and evaluated zero-shot; B's SAE trained from that stitched
initialisation per width and budget; and the probes / steering / feature-class analysis of the
pair. Keys hash each trial's own setting and the keys it depends on, so the same declaration
always yields the same keys (resume) and a changed setting yields new ones only where it
matters (a new probe setting re-runs the probes, not the stitches). Pure: no ray, no mlflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from raysae.config import ConfigError, JobConfig, StitchConfig, TrainConfig, digest, to_dict
from raysae.costs import (
    Calibration,
    PhaseCost,
    SAECost,
    cache_phase,
    format_tokens,
    phase_costs,
)
from raysae.models import hook_name, model_dims
from raysae.stitching.stitch import lstsq_flops

Role = Literal["stitch", "scratch_a", "scratch_b", "zeroshot", "transfer", "probes"]
PHASES: dict[str, tuple[Role, ...]] = {
    "fit": ("stitch", "scratch_a", "scratch_b"),
    "zeroshot": ("zeroshot",),
    "transfer": ("transfer",),
    "probes": ("probes",),
}
"""The sweep's phases in dependency order, with the roles of the trials each runs together
(the `fit` phase trains the stitches and both models' scratch SAEs at once)."""
SWEEP_KIND = "stitch"


def phase_of(role: Role) -> str:
    """The phase that runs trials of this role."""
    return next(p for p, roles in PHASES.items() if role in roles)


@dataclass(frozen=True)
class StitchTrial:
    """One run of the stitch grid."""

    role: Role
    """What the trial is: a stitch, an SAE of A or of B, a zero-shot transfer, a stitched-init
    SAE of B, or a pair's probes."""
    layer_a: int | None
    """A's layer (None for an SAE of B trained from scratch)."""
    layer_b: int | None
    """B's layer (None for an SAE of A)."""
    width: int | None
    """SAE width d_sae (None for a stitch or the probes)."""
    budget: int
    """Training tokens (0 for an evaluation)."""
    key: str
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()

    @property
    def phase(self) -> str:
        """The phase of the sweep that runs it."""
        return phase_of(self.role)

    @property
    def pair(self) -> str:
        return f"A{self.layer_a}-B{self.layer_b}"


def pairs_of(stitch: StitchConfig, matches: dict[int, int] | None = None) -> tuple[tuple[int, int], ...]:
    """The explicit pairs, then each matched A layer with its best B layer (deduplicated)."""
    pairs = list(stitch.pairs)
    if stitch.match_layers:
        if matches is None:
            raise ValueError("stitch.match_layers needs the layer matching's result")
        pairs += [(a, matches[a]) for a in stitch.match_layers]
    return tuple(dict.fromkeys(tuple(p) for p in pairs))


def budgets_of(job: JobConfig) -> tuple[int, ...]:
    assert job.stitch is not None
    return job.stitch.budgets or (job.train.num_tokens,)


def validate(job: JobConfig) -> None:
    """Checks that need both the job and the stitch section (ConfigError names the field)."""
    s = job.stitch
    if s is None:
        raise ConfigError("stitch: the config has no stitch section")
    for w in s.widths:  # the architecture's checks at each width (k, Matryoshka widths)
        for name, value, expected in job.sae.width_problems(w, f"the stitch width ({w})"):
            raise ConfigError(f"stitch.widths: got {w}, but {name} is {value!r}: expected "
                              f"{expected}")
    short = [b for b in budgets_of(job) if b < job.train.batch_size]
    if short:
        raise ConfigError(
            f"stitch.budgets: got {short}, expected budgets >= train.batch_size ({job.train.batch_size})"
        )


def _key(kind: str, setting: Any) -> str:
    return f"{kind}:{digest(setting)}"


def expand(
    job: JobConfig, fingerprints: tuple[str, str], matches: dict[int, int] | None = None
) -> list[StitchTrial]:
    """Every trial, in phase order. `fingerprints` are the activation fingerprints of A and B."""
    validate(job)
    s = job.stitch
    assert s is not None
    fp_a, fp_b = fingerprints
    sae, train = to_dict(job.sae), to_dict(job.train)
    stitch_setting = {k: v for k, v in to_dict(s).items()
                      if k in ("num_tokens", "batch_size", "lr", "lr_warmup_frac", "alpha",
                               "grad_clip", "init", "lstsq_tokens", "checkpoint_every_tokens")}
    base = {"raysae.sweep_kind": SWEEP_KIND, "raysae.site": s.site,
            "raysae.architecture": job.sae.architecture}
    many = len(budgets_of(job)) > 1

    def make(role: Role, la: int | None, lb: int | None, width: int | None, budget: int,
             name: str, setting: dict[str, Any], deps: tuple[str, ...] = ()) -> StitchTrial:
        tags = {**base, "raysae.role": role, "raysae.phase": phase_of(role),
                "raysae.layer_a": "" if la is None else str(la),
                "raysae.layer_b": "" if lb is None else str(lb),
                "raysae.width": "" if width is None else str(width),
                "raysae.budget": str(budget)}
        if la is not None and lb is not None:
            tags["raysae.pair"] = f"A{la}-B{lb}"
        key = _key(role, {"site": s.site, "layers": [la, lb], "width": width, "budget": budget,
                           "deps": list(deps), **setting})
        return StitchTrial(role, la, lb, width, budget, key, name, tags, deps)

    pairs = pairs_of(s, matches)
    trials: dict[str, StitchTrial] = {}

    def add(t: StitchTrial) -> StitchTrial:
        return trials.setdefault(t.key, t)  # a layer shared by two pairs trains once

    stitches = {p: add(make("stitch", *p, None, s.num_tokens, f"A{p[0]}→B{p[1]} stitch",
                            {"fp": [fp_a, fp_b], "stitch": stitch_setting})) for p in pairs}
    scratch_a = {(la, w): add(make("scratch_a", la, None, w, job.train.num_tokens,
                                   f"A{la} SAE w{w}", {"fp": fp_a, "sae": sae, "train": train}))
                 for la, _ in pairs for w in s.widths}
    for _, lb in pairs:  # nothing depends on B's scratch SAEs: the analysis finds them by tags
        for w in s.widths:
            for b in budgets_of(job):
                name = f"B{lb} scratch w{w}" + (f" {format_tokens(b)}" if many else "")
                add(make("scratch_b", None, lb, w, b, name, {"fp": fp_b, "sae": sae, "train": train}))
    for la, lb in pairs:
        for w in s.widths:
            deps = (stitches[la, lb].key, scratch_a[la, w].key)
            zeroshot = add(make("zeroshot", la, lb, w, 0, f"A{la}→B{lb} zero-shot w{w}", {}, deps))
            for b in budgets_of(job):  # B's SAE starts from the zero-shot trial's saved SAE
                suffix = f" {format_tokens(b)}" if many else ""
                add(make("transfer", la, lb, w, b, f"A{la}→B{lb} stitched init w{w}{suffix}",
                         {"train": train}, (zeroshot.key,)))
        if s.probes is not None or s.variants is not None:
            deps = (stitches[la, lb].key, *(scratch_a[la, w].key for w in s.widths))
            setting = {"probes": None if s.probes is None else to_dict(s.probes),
                       "variants": s.variants}
            add(make("probes", la, lb, None, 0, f"A{la}→B{lb} probes", setting, deps))
    order = [r for roles in PHASES.values() for r in roles]
    return sorted(trials.values(), key=lambda t: order.index(t.role))


def phases(trials: list[StitchTrial]) -> dict[str, list[StitchTrial]]:
    """Trials grouped by phase, in dependency order; every dependency sits in an earlier phase
    (ValueError if not)."""
    out: dict[str, list[StitchTrial]] = {p: [] for p in PHASES}
    for t in trials:
        out[t.phase].append(t)
    done: set[str] = set()
    for p, group in out.items():
        for t in group:
            late = [k for k in t.depends_on if k not in done]
            if late:
                raise ValueError(f"trial {t.name!r} ({p}) depends on {late}, not in an earlier phase")
        done.update(t.key for t in group)
    return out


def sae_job(job: JobConfig, trial: StitchTrial, large: bool) -> JobConfig:
    """The single-model job an SAE trial of the grid trains with: model A or B, its width, its
    budget; the same SAE and training settings otherwise (scratch and stitched init alike)."""
    assert job.stitch is not None and trial.width is not None
    model = job.stitch.large if large else job.model
    cache = dataclasses.replace(job.cache, sites=(job.stitch.site,),
                                layers=(trial.layer_b if large else trial.layer_a,))
    train: TrainConfig = dataclasses.replace(job.train, num_tokens=trial.budget)
    sae = dataclasses.replace(job.sae, d_sae=trial.width)
    return dataclasses.replace(job, model=model, cache=cache, train=train, sae=sae, sweep=None)


def cache_jobs(job: JobConfig, pairs: tuple[tuple[int, int], ...]) -> tuple[JobConfig, JobConfig]:
    """The caching jobs of A and B: the stitch site at every layer of the pairs, same tokens."""
    assert job.stitch is not None
    site = job.stitch.site
    a = dataclasses.replace(job, cache=dataclasses.replace(
        job.cache, sites=(site,), layers=tuple(sorted({p[0] for p in pairs}))), sweep=None)
    b = dataclasses.replace(a, model=job.stitch.large, cache=dataclasses.replace(
        a.cache, layers=tuple(sorted({p[1] for p in pairs}))))
    return a, b


def sae_costs(job: JobConfig, trials: list[StitchTrial]
            ) -> tuple[dict[str, list[SAECost]], dict[str, float]]:
    """The SAE trainings of each training phase and the stitches' FLOPs (20 d_A d_B per
    token, `stitch.stitch_flops_per_token`, plus the least-squares start, `stitch.lstsq_flops`),
    for `raysae.costs`."""
    s = job.stitch
    assert s is not None
    d_a, d_b = model_dims(job.model)[1], model_dims(s.large)[1]
    saes: dict[str, list[SAECost]] = {"fit": [], "transfer": []}
    for t in trials:
        if t.role in ("scratch_a", "scratch_b", "transfer"):
            large = t.role != "scratch_a"
            layer = t.layer_b if large else t.layer_a
            saes[t.phase].append(SAECost(s.large if large else job.model,
                                            hook_name(s.site, layer),
                                            dataclasses.replace(job.sae, d_sae=t.width), t.budget))
    stitches = sum(t.role == "stitch" for t in trials)
    lstsq = lstsq_flops(s.lstsq_tokens, d_a, d_b) if s.init == "lstsq" else 0.0
    return saes, {"fit": stitches * (20.0 * d_a * d_b * s.num_tokens + lstsq)}


def sweep_costs(job: JobConfig, cal: Calibration | None = None, slots: int = 1
         ) -> tuple[JobConfig, str, list[PhaseCost]]:
    """The stitch sweep's costs: always cached (a stitch reads both models' activations of the
    same tokens), A's and B's caches, and every training phase. Matched layers' B partners are
    unknown before the matching runs: the costs cover the explicit pairs and, for each matched
    A layer, B's layer of the same relative depth."""
    s = job.stitch
    assert s is not None
    matches = None
    if s.match_layers:
        depth_a, depth_b = model_dims(job.model)[0], model_dims(s.large)[0]
        matches = {a: min(depth_b - 1, round((a + 1) * depth_b / depth_a) - 1) for a in s.match_layers}
    pairs = pairs_of(s, matches)
    job_a, job_b = cache_jobs(job, pairs)
    trials = expand(job, ("plan", "plan"), matches)
    saes, flops = sae_costs(job, trials)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, source="cached"))
    caches = [dataclasses.replace(cache_phase(j, cal, slots), name=f"cache {m}")
              for j, m in ((job_a, "A"), (job_b, "B"))]
    trainings = phase_costs(job, saes, cal, slots, flops, with_cache=False)
    return job, "cached: a stitch reads both models' activations of the same tokens", caches + trainings
