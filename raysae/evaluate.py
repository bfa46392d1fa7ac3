"""Evaluate an SAE inside its language model (pure torch): the SAE is spliced into the residual
stream at a site and the model's next-token loss is compared with the clean model and with the
site zero-ablated, on held-out tokens.

The SAE replaces the stream only at non-special positions (BOS/EOS/PAD), as the shards exclude
those positions from training: BOS activations are norm outliers no SAE is trained on. Zero
ablation uses the same positions, so CES = 1 means a perfect splice and 0 a zero-ablation.
CE and KL average over positions whose *target* token is not special. Evaluating SAE_j on the
activations of layer i (the zero-shot transfer matrix) is the same call with `layer=i`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raysae import metrics
from raysae.models import capture, hook_name, splice
from raysae.sae import SAE
from raysae.shards import atomic_write_bytes


@dataclass(frozen=True)
class EvalResult:
    """All metrics of one SAE at one site, on held-out tokens."""

    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ces: float
    kl_spliced: float
    kl_zero: float
    kl_score: float
    mse: float
    """per element, as SAELens reports it"""
    l2: float
    """mean over tokens of ||x - x̂||² (the paper's L2)"""
    explained_variance: float
    l0: float
    l1: float
    dead_fraction: float
    """latents that never fired on these tokens"""
    dense_fraction: float
    num_tokens: int
    prefixes: dict[str, float] = field(default_factory=dict)
    """matryoshka_batchtopk: `mse_prefix_{w}` and `explained_variance_prefix_{w}` of each
    prefix width w (the reconstruction from the first w latents alone); empty otherwise"""

    def as_dict(self) -> dict[str, float]:
        """The metrics as one flat mapping (the prefixes' entries beside the others)."""
        out = asdict(self)
        return out | out.pop("prefixes")


def next_token_stats(
    logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor,
    ref: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE over masked positions, summed KL(ref || this), and the log-probs. `ref`: the
    reference's probabilities and log-probabilities."""
    logp = F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    tgt = ids_BT[:, 1:]
    m = mask_BT[:, 1:]
    ce = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[m].sum()
    kl = torch.zeros(())
    if ref is not None:
        p, ref_logp = ref
        kl = (p * (ref_logp - logp)).sum(-1)[m].sum()
    return ce, kl, logp


@dataclass
class _Recon:
    """Running reconstruction and sparsity sums of one SAE."""

    fire_counts_F: torch.Tensor
    ev: metrics.ExplainedVariance = field(default_factory=metrics.ExplainedVariance)
    sq_err: float = 0.0
    l0: float = 0.0
    l1: float = 0.0
    n: int = 0
    ce: float = 0.0
    kl: float = 0.0
    prefixes: list[tuple[metrics.ExplainedVariance, list[float]]] = field(default_factory=list)
    """Per Matryoshka prefix: its explained variance and summed squared error."""

    def update(self, x_ND: torch.Tensor, out) -> None:
        self.ev.update(x_ND, out.recon_BD.float())
        self.sq_err += float(((out.recon_BD.float() - x_ND) ** 2).sum())
        if out.prefix_recons and not self.prefixes:
            self.prefixes = [(metrics.ExplainedVariance(), [0.0]) for _ in out.prefix_recons]
        for (ev, sq_err), recon in zip(self.prefixes, out.prefix_recons):
            ev.update(x_ND, recon.float())
            sq_err[0] += float(((recon.float() - x_ND) ** 2).sum())
        active_NF = out.feats_BF != 0
        self.l0 += float(active_NF.sum())
        self.l1 += float(out.feats_BF.abs().sum())
        self.fire_counts_F += active_NF.sum(0)
        self.n += len(x_ND)


ZeroAblations = dict[tuple[str, int], tuple[float, float]]
"""(site, layer) -> the summed CE and KL of the model with that site zero-ablated, on one
held-out token set: the same for every SAE of the site, so computed once per token set."""


def read_zero_ablations(path: Path) -> ZeroAblations:
    """The zero-ablations kept in `path` (JSON, `{"site:layer": [ce, kl]}`); none if absent."""
    if not path.exists():
        return {}
    kept = json.loads(path.read_text())
    return {(site, int(layer)): (ce, kl) for name, (ce, kl) in kept.items()
            for site, layer in [name.split(":")]}


def write_zero_ablations(path: Path, values: ZeroAblations) -> None:
    """Add `values` to the file (written to a temporary name, then renamed: a reader never sees
    half a file; two writers at once can only lose an entry, which is then recomputed)."""
    kept = {f"{site}:{layer}": list(v) for (site, layer), v in {**read_zero_ablations(path),
                                                                 **values}.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(kept, indent=1, sort_keys=True).encode())


@torch.inference_mode()
def evaluate_saes(
    model: nn.Module,
    saes: Mapping[str, tuple[SAE, str, int]],
    tokens_NT: torch.Tensor,
    special_ids: Sequence[int] = (),
    batch_size: int = 8,
    dense_threshold: float = 0.1,
    zero_ablations: ZeroAblations | None = None,
) -> dict[str, EvalResult]:
    """CES, KL score and the reconstruction metrics of every SAE `key -> (sae, site, layer)`
    spliced at its site, in one pass over the tokens: per batch one clean forward (its logits
    and the activations of every site) is shared by all SAEs, then one spliced forward per SAE,
    and one zero-ablated forward per site missing from `zero_ablations` (which is filled in:
    pass the same dict for later calls on the same tokens and the zero-ablations are not
    recomputed). n SAEs on s sites cost 1 + n (+ s the first time) forwards per batch instead
    of 3n."""
    device = next(model.parameters()).device
    special = torch.tensor(list(special_ids), dtype=torch.long, device=device)
    zero_ablations = {} if zero_ablations is None else zero_ablations
    sites = sorted({(site, layer) for _, site, layer in saes.values()}, key=lambda s: (s[1], s[0]))
    new_zero = {s: [0.0, 0.0] for s in sites if s not in zero_ablations}
    sums = {key: _Recon(torch.zeros(sae.d_sae, dtype=torch.long, device=device))
            for key, (sae, _, _) in saes.items()}
    ce_clean = 0.0
    n_targets = 0
    for s in range(0, len(tokens_NT), batch_size):
        ids_BT = tokens_NT[s : s + batch_size].to(device)
        keep_BT = ~torch.isin(ids_BT, special)
        n_targets += int(keep_BT[:, 1:].sum())
        with capture(model, sites) as acts:
            ce, _, ref_logp = next_token_stats(model(ids_BT).logits, ids_BT, keep_BT, None)
        ce_clean += float(ce)
        ref = (ref_logp.exp(), ref_logp)
        for site, layer in new_zero:
            with splice(model, site, layer, only_at(keep_BT, torch.zeros_like)):
                ce, kl, _ = next_token_stats(model(ids_BT).logits, ids_BT, keep_BT, ref)
            new_zero[(site, layer)][0] += float(ce)
            new_zero[(site, layer)][1] += float(kl)
        for key, (sae, site, layer) in saes.items():
            x_ND = acts[hook_name(site, layer)][keep_BT].float()
            sums[key].update(x_ND, sae(x_ND.to(sae.W_enc.dtype)))
            fn = only_at(keep_BT, lambda x, sae=sae: sae(x.to(sae.W_enc.dtype)).recon_BD.to(x.dtype))
            with splice(model, site, layer, fn):
                ce, kl, _ = next_token_stats(model(ids_BT).logits, ids_BT, keep_BT, ref)
            sums[key].ce += float(ce)
            sums[key].kl += float(kl)
    zero_ablations.update({k: (ce, kl) for k, (ce, kl) in new_zero.items()})

    per_target = max(n_targets, 1)
    return {key: _result(sae, sums[key], ce_clean / per_target, zero_ablations[(site, layer)],
                         per_target, dense_threshold)
            for key, (sae, site, layer) in saes.items()}


def _result(sae: SAE, r: _Recon, ce_clean: float, zero: tuple[float, float], per_target: int,
            dense_threshold: float) -> EvalResult:
    """One SAE's `EvalResult` from its pass's sums (CE and KL sums are per target token)."""
    ce_zero, kl_zero = (v / per_target for v in zero)
    mean = dict(ce_clean=ce_clean, ce_spliced=r.ce / per_target, ce_zero=ce_zero,
                kl_spliced=r.kl / per_target, kl_zero=kl_zero)
    return EvalResult(
        **mean,
        ces=metrics.ces(mean["ce_clean"], mean["ce_spliced"], ce_zero),
        kl_score=metrics.kl_score(mean["kl_spliced"], kl_zero),
        mse=r.sq_err / max(r.n * sae.d_in, 1),
        l2=r.sq_err / max(r.n, 1),
        explained_variance=r.ev.compute(),
        l0=r.l0 / max(r.n, 1),
        l1=r.l1 / max(r.n, 1),
        dead_fraction=metrics.dead_fraction_from_counts(r.fire_counts_F),
        dense_fraction=metrics.dense_fraction(r.fire_counts_F, r.n, dense_threshold),
        num_tokens=r.n,
        prefixes=_prefix_metrics(sae, r),
    )


def _prefix_metrics(sae: SAE, r: _Recon) -> dict[str, float]:
    """The per-prefix entries of a Matryoshka SAE's `EvalResult` (none for the others)."""
    out = {}
    for w, (ev, (sq_err,)) in zip(sae.widths, r.prefixes):
        out[f"mse_prefix_{w}"] = sq_err / max(r.n * sae.d_in, 1)
        out[f"explained_variance_prefix_{w}"] = ev.compute()
    return out


def evaluate_saes_kept(path: Path, model: nn.Module, saes: Mapping[str, tuple[SAE, str, int]],
                       tokens_NT: torch.Tensor, special_ids: Sequence[int] = ()
                       ) -> dict[str, EvalResult]:
    """`evaluate_saes` with the zero-ablations read from `path` and the new ones added to it
    (the file belongs to one model and one held-out token set)."""
    zero_ablations = read_zero_ablations(path)
    known = set(zero_ablations)
    results = evaluate_saes(model, saes, tokens_NT, special_ids, zero_ablations=zero_ablations)
    if set(zero_ablations) != known:
        write_zero_ablations(path, zero_ablations)
    return results


def evaluate_sae(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    tokens_NT: torch.Tensor,
    special_ids: Sequence[int] = (),
    batch_size: int = 8,
    dense_threshold: float = 0.1,
) -> EvalResult:
    """CES, KL score and the reconstruction metrics of `sae` spliced at (site, layer)."""
    return evaluate_saes(model, {"sae": (sae, site, layer)}, tokens_NT, special_ids, batch_size,
                         dense_threshold)["sae"]


def only_at(
    keep_BT: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply fn to the kept positions of a [B, T, D] stream, leave the others as they are."""

    def apply(x_BTD: torch.Tensor) -> torch.Tensor:
        out = x_BTD.clone()
        out[keep_BT] = fn(x_BTD[keep_BT])
        return out

    return apply
