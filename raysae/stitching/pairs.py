"""The stitch sweep's analyses, as plain functions its Ray tasks and its driver call (pure
torch: no ray, no mlflow): the layer match that picks each matched A layer's partner in B; A's
SAE carried to B through a pair's stitch; a pair's probes, steering and feature classes; and,
across the grid, what each SAE's feature evaluation is compared with and which stitch's FLOPs
a stitched-init SAE is charged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from raysae.activations import heldout_tokens, job_tokens, special_token_ids
from raysae.config import JobConfig
from raysae.features.targets import FeatureTarget, SAERef
from raysae.models import hook_name, load_lm, load_tokenizer
from raysae.sae import SAE
from raysae.stitching.grid import StitchTrial
from raysae.stitching.stitch import Stitch, transfer_sae


def feature_targets(trials: list[StitchTrial]) -> list[FeatureTarget]:
    """One target per SAE of the sweep (A's, B's scratch, zero-shot and stitched-init ones); an
    SAE of A is compared with its twins on B: the zero-shot transfer and, per zero-shot, the
    stitched-init SAE of the largest budget (the same feature indices, carried by the stitch)."""
    targets = []
    for t in trials:
        if t.role not in ("scratch_a", "scratch_b", "zeroshot", "transfer"):
            continue
        compare: list[SAERef] = []
        if t.role == "scratch_a":
            for z in trials:
                if z.role == "zeroshot" and t.key in z.depends_on:
                    compare.append(SAERef(z.name, z.key, z.layer_b, True))
                    grown = [c for c in trials if c.role == "transfer" and c.depends_on == (z.key,)]
                    if grown:
                        c = max(grown, key=lambda c: c.budget)
                        compare.append(SAERef(c.name, c.key, c.layer_b, True))
        large = t.role != "scratch_a"
        layer = t.layer_b if large else t.layer_a
        targets.append(FeatureTarget(t.key, t.name, layer, large, tuple(compare)))  # type: ignore[arg-type]
    return targets


def stitch_of(trials: list[StitchTrial]) -> dict[str, str]:
    """Stitched-init SAE key -> the key of the stitch its initialisation was carried through
    (its zero-shot trial's stitch): whose FLOPs count against it."""
    by_key = {t.key: t for t in trials}
    return {t.key: by_key[t.depends_on[0]].depends_on[0] for t in trials if t.role == "transfer"}


def carried_sae(job: JobConfig, sae_a: SAE, stitch: Stitch, trial: StitchTrial) -> SAE:
    """A's SAE carried to B through the pair's stitch (`stitch.transfer_sae`), its metadata
    naming B's model and hook and where it came from (`trial.depends_on`: stitch, SAE)."""
    s = job.stitch
    assert s is not None and trial.layer_b is not None
    stitch_key, sae_key = trial.depends_on
    sae = transfer_sae(sae_a, stitch)
    sae.metadata = dataclasses.replace(
        sae.metadata, model_name=s.large.name, hook_name=hook_name(s.site, trial.layer_b),
        extras={**sae.metadata.extras, "stitched_from": sae_key, "stitch": stitch_key},
    )
    return sae


def heldout(job: JobConfig) -> tuple[torch.Tensor, list[int]]:
    """The held-out tokens and the special token ids (A's tokenizer: the pair shares it)."""
    return heldout_tokens(job), special_token_ids(job.model, load_tokenizer(job.model, job.data))


def pair_analysis(job: JobConfig, trial: StitchTrial, stitch: Stitch, saes: dict[int, SAE],
                  tables: Path) -> dict[str, float]:
    """Probes, sparse probes and steering through the pair's stitch (`stitch.probes`), and the
    structural / semantic feature classes of each of A's SAEs (`stitch.variants`, by width; each
    table written to `tables/w<width>.parquet`)."""
    from raysae.stitching.feature_classes import class_summary, feature_class_table, load_variants
    from raysae.stitching.probes import load_labelled, probe_and_steer

    s = job.stitch
    assert s is not None and trial.layer_a is not None and trial.layer_b is not None
    model_a, model_b = load_lm(job.model), load_lm(s.large)
    tokenizer = load_tokenizer(job.model, job.data)
    special = special_token_ids(job.model, tokenizer)
    la, lb = trial.layer_a, trial.layer_b
    values: dict[str, float] = {}
    if s.probes is not None:
        data = load_labelled(s.probes, tokenizer, job.data.context_length)
        values |= probe_and_steer(model_a, model_b, stitch, s.site, la, lb, data, s.probes, saes, special)
    if s.variants is not None:
        tokens, _ = heldout(job)
        special_t = torch.tensor(special, dtype=torch.long)
        variants = load_variants(s.variants)
        for width, sae in saes.items():
            table = feature_class_table(model_a, model_b, sae, stitch, s.site, la, lb, tokens,
                                        ~torch.isin(tokens, special_t), variants,
                                        variants_mask_GVT=~torch.isin(variants, special_t))
            values |= {f"features/w{width}/{k}": v for k, v in class_summary(table).items()}
            table.write_parquet(tables / f"w{width}.parquet")
    return values


def match_layers(job: JobConfig) -> dict[str, Any]:
    """Similarity of every layer of A with every layer of B at the stitch site, on held-out
    tokens after the evaluation tokens; the best B layer per matched A layer."""
    from raysae.stitching.matching import best_matches, layer_similarity

    s = job.stitch
    assert s is not None
    skip = job.data.num_tokens + job.train.eval_tokens
    tokens = torch.from_numpy(job_tokens(job, s.match_tokens, skip_tokens=skip)).long()
    special = special_token_ids(job.model, load_tokenizer(job.model, job.data))
    mask = ~torch.isin(tokens, torch.tensor(special, dtype=torch.long))
    model_a, model_b = load_lm(job.model), load_lm(s.large)
    sim = layer_similarity(model_a, model_b, tokens, s.site, s.match_method, mask_NT=mask)
    layers_a, layers_b = list(range(sim.shape[0])), list(range(sim.shape[1]))
    best = best_matches(sim, layers_a, layers_b)
    return {
        "method": s.match_method,
        "layers_a": layers_a,
        "layers_b": layers_b,
        "matrix": sim.tolist(),
        "best": {str(a): best[a] for a in s.match_layers},
    }
