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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysae import metrics
from raysae.models import hook_name, run_with_cache, splice
from raysae.sae import SAE
from raysae.stitching.stitch import Stitch, map_quality


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
    dense_fraction: float
    num_tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _next_token_stats(
    logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor, ref_logp: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE over masked positions, summed KL(ref || this), and the log-probs."""
    logp = F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    tgt = ids_BT[:, 1:]
    m = mask_BT[:, 1:]
    ce = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[m].sum()
    kl = torch.zeros(())
    if ref_logp is not None:
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)[m].sum()
    return ce, kl, logp


@torch.inference_mode()
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
    device = next(model.parameters()).device
    special = torch.tensor(list(special_ids), dtype=torch.long, device=device)
    sums = dict(ce_clean=0.0, ce_spliced=0.0, ce_zero=0.0, kl_spliced=0.0, kl_zero=0.0)
    n_targets = 0
    ev = metrics.ExplainedVariance()
    sq_err = l0_sum = l1_sum = 0.0
    fire_counts_F = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    n_vectors = 0
    for s in range(0, len(tokens_NT), batch_size):
        ids_BT = tokens_NT[s : s + batch_size].to(device)
        keep_BT = ~torch.isin(ids_BT, special)
        targets_BT = keep_BT.clone()
        n_targets += int(targets_BT[:, 1:].sum())

        x_BTD = run_with_cache(model, ids_BT, [(site, layer)])[f"blocks.{layer}.hook_{site}"]
        x_ND = x_BTD[keep_BT].float()
        out = sae(x_ND.to(sae.W_enc.dtype))
        ev.update(x_ND, out.recon_BD.float())
        sq_err += float(((out.recon_BD.float() - x_ND) ** 2).sum())
        active_NF = out.feats_BF != 0
        l0_sum += float(active_NF.sum())
        l1_sum += float(out.feats_BF.abs().sum())
        fire_counts_F += active_NF.sum(0)
        n_vectors += len(x_ND)

        ce, _, ref = _next_token_stats(model(ids_BT).logits, ids_BT, targets_BT, None)
        sums["ce_clean"] += float(ce)
        for key, fn in (
            ("spliced", lambda x: sae(x.to(sae.W_enc.dtype)).recon_BD.to(x.dtype)),
            ("zero", torch.zeros_like),
        ):
            with splice(model, site, layer, _only_at(keep_BT, fn)):
                ce, kl, _ = _next_token_stats(model(ids_BT).logits, ids_BT, targets_BT, ref)
            sums[f"ce_{key}"] += float(ce)
            sums[f"kl_{key}"] += float(kl)

    mean = {k: v / max(n_targets, 1) for k, v in sums.items()}
    return EvalResult(
        **mean,
        ces=metrics.ces(mean["ce_clean"], mean["ce_spliced"], mean["ce_zero"]),
        kl_score=metrics.kl_score(mean["kl_spliced"], mean["kl_zero"]),
        mse=sq_err / max(n_vectors * sae.d_in, 1),
        l2=sq_err / max(n_vectors, 1),
        explained_variance=ev.compute(),
        l0=l0_sum / max(n_vectors, 1),
        l1=l1_sum / max(n_vectors, 1),
        dead_fraction=metrics.dead_fraction_from_counts(fire_counts_F),
        dense_fraction=metrics.dense_fraction(fire_counts_F, n_vectors, dense_threshold),
        num_tokens=n_vectors,
    )


def _only_at(
    keep_BT: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply fn to the kept positions of a [B, T, D] stream, leave the others as they are."""

    def apply(x_BTD: torch.Tensor) -> torch.Tensor:
        out = x_BTD.clone()
        out[keep_BT] = fn(x_BTD[keep_BT])
        return out

    return apply


@torch.inference_mode()
def evaluate_stitch(
    model_a: nn.Module,
    model_b: nn.Module,
    stitch: Stitch,
    site: str,
    layer_a: int,
    layer_b: int,
    tokens_NT: torch.Tensor,
    special_ids: Sequence[int] = (),
    batch_size: int = 8,
) -> dict[str, float]:
    """Next-token CE (nats) of A, B, the stitched models and the round trips, and each map's
    MSE / explained variance, on the same held-out tokens.

    `a_to_b` runs A up to (site, layer_a), maps the stream with T↑ and continues in B from
    (site, layer_b); `b_to_a` the reverse with T↓; `a_round_trip` continues A after T↓T↑, and
    `b_round_trip` B after T↑T↓. Special-token positions (BOS) keep the receiving model's own
    stream, as the maps are fit without them; CE is averaged over non-special targets.
    """
    dev_a, dev_b = next(model_a.parameters()).device, next(model_b.parameters()).device
    special = torch.tensor(list(special_ids), dtype=torch.long)
    sums = dict.fromkeys(("a", "b", "a_to_b", "b_to_a", "a_round_trip", "b_round_trip"), 0.0)
    n_targets = 0
    xs_a, xs_b = [], []
    ha, hb = hook_name(site, layer_a), hook_name(site, layer_b)
    for s in range(0, len(tokens_NT), batch_size):
        ids = tokens_NT[s : s + batch_size]
        keep = ~torch.isin(ids, special)
        n_targets += int(keep[:, 1:].sum())
        a = run_with_cache(model_a, ids.to(dev_a), [(site, layer_a)])[ha].float()
        b = run_with_cache(model_b, ids.to(dev_b), [(site, layer_b)])[hb].float()
        xs_a.append(a[keep.to(dev_a)].cpu())
        xs_b.append(b[keep.to(dev_b)].cpu())
        dev_s = stitch.P_up.device
        up, down = stitch.up(a.to(dev_s)), stitch.down(b.to(dev_s))
        runs = (
            ("a", model_a, None),
            ("b", model_b, None),
            ("a_to_b", model_b, (layer_b, up)),
            ("b_to_a", model_a, (layer_a, down)),
            ("a_round_trip", model_a, (layer_a, stitch.down(up))),
            ("b_round_trip", model_b, (layer_b, stitch.up(down))),
        )
        for name, model, replace in runs:
            dev = next(model.parameters()).device
            ids_d, keep_d = ids.to(dev), keep.to(dev)
            if replace is None:
                logits = model(ids_d).logits
            else:
                layer, x_BTD = replace
                new = x_BTD.to(dev)
                fn = _only_at(keep_d, lambda _x, new=new, keep_d=keep_d: new[keep_d].to(_x.dtype))
                with splice(model, site, layer, fn):
                    logits = model(ids_d).logits
            ce, _, _ = _next_token_stats(logits, ids_d, keep_d, None)
            sums[name] += float(ce)
    out = {f"ce/{k}": v / max(n_targets, 1) for k, v in sums.items()}
    quality = map_quality(stitch, torch.cat(xs_a), torch.cat(xs_b))
    return out | {f"map/{k}": v for k, v in quality.items()}
