"""The layer-transfer study's scores, as pure functions of tensors and numbers.

Normalized CES (how much of the gap between the zero-shot SAE_j and the scratch SAE_i a
transferred SAE_{i<-j} closes; defined in `raysae.metrics`, which the stop rules read too, and
re-exported here), MMCS between two decoders, and the transfer score of the paper's Figure 6
(shared top-logit, bottom-logit and max-activating tokens per feature index, each part and the
three combined).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from raysae.features.attribution import NormFrame
from raysae.metrics import normalized_ces as normalized_ces  # re-exported: the study's score
from raysae.metrics import normalized_ces_defined as normalized_ces_defined


@torch.no_grad()
def mmcs(W_dec_FD: Tensor, W_dec_other_GD: Tensor, chunk_rows: int = 1024) -> float:
    """Mean max cosine similarity: mean over rows u of the first decoder of max_v cos(u, v)
    over rows v of the second. Not symmetric. Rows are processed `chunk_rows` at a time so the
    [chunk, G] similarity block stays small at any width."""
    if W_dec_FD.shape[1] != W_dec_other_GD.shape[1]:
        raise ValueError(
            f"decoders live in different spaces: rows of width {W_dec_FD.shape[1]} and "
            f"{W_dec_other_GD.shape[1]}"
        )
    a_FD = torch.nn.functional.normalize(W_dec_FD.float(), dim=1)
    b_GD = torch.nn.functional.normalize(W_dec_other_GD.float().to(a_FD.device), dim=1)
    total = torch.zeros((), dtype=torch.float64, device=a_FD.device)
    for start in range(0, a_FD.shape[0], chunk_rows):
        best_C = (a_FD[start : start + chunk_rows] @ b_GD.T).amax(dim=1)
        total += best_C.to(torch.float64).sum()
    return float(total / a_FD.shape[0])


# ---------------------------------------------------------------------------------------------
# The transfer score (Figure 6 of the layer-wise transfer paper): how many of the tokens that
# characterise feature f of SAE_i are also those of feature f of SAE_{i±1<-i}.


@torch.no_grad()
def top_logit_tokens(
    W_dec_FD: Tensor,
    W_U_DV: Tensor,
    k: int,
    largest: bool = True,
    chunk_rows: int = 1024,
    frame: NormFrame | None = None,
) -> Tensor:
    """Token ids [F, k] of the k largest (or, with largest=False, smallest) logits each decoder
    row writes directly through the unembedding W_U [D, V]. With the final norm's `frame`
    (`features.attribution.final_norm_frame`) a row is read as C(W_dec[i]) ⊙ γ, what it writes
    into the logits through the norm, as the direct logit attribution reads it (σ, a positive
    scale per token, leaves the order alone; TransformerLens folds γ into W_U the same way);
    None reads the raw rows. Rows go `chunk_rows` at a time so the [chunk, V] logit block stays
    small at any vocabulary size."""
    if W_dec_FD.shape[1] != W_U_DV.shape[0]:
        raise ValueError(
            f"decoder rows of width {W_dec_FD.shape[1]} do not match W_U [D, V] = {tuple(W_U_DV.shape)}"
        )
    W_U = W_U_DV.float().to(W_dec_FD.device)
    out = []
    for s in range(0, W_dec_FD.shape[0], chunk_rows):
        rows_CD = W_dec_FD[s : s + chunk_rows].float()
        if frame is not None:
            rows_CD = (frame.centre(rows_CD) * frame.gamma_D.to(rows_CD.device)).float()
        out.append((rows_CD @ W_U).topk(k, dim=1, largest=largest).indices)
    return torch.cat(out).long()


@torch.no_grad()
def max_activating_tokens(
    feats_NF: Tensor, token_ids_N: Tensor, k: int, chunk_elems: int = 1 << 24
) -> Tensor:
    """Token ids [F, k] of the k distinct tokens on which each feature reaches its highest
    activation, best first. Distinct vocabulary items, not positions, so that one frequent
    token cannot fill every slot. Slots a feature never fires for (fewer than k tokens with a
    positive activation) hold -1, which `transfer_score` never counts as a match."""
    if feats_NF.shape[0] != token_ids_N.shape[0]:
        raise ValueError(f"{feats_NF.shape[0]} activation rows, {token_ids_N.shape[0]} token ids")
    ids_N = token_ids_N.long().to(feats_NF.device)
    V = int(ids_N.max()) + 1 if ids_N.numel() else 1
    F = feats_NF.shape[1]
    rows = max(1, chunk_elems // max(V, feats_NF.shape[0]))
    out = []
    for s in range(0, F, rows):
        f_CN = feats_NF[:, s : s + rows].float().t()
        best_CV = torch.zeros(f_CN.shape[0], V, device=f_CN.device)  # 0 = never fired
        best_CV.scatter_reduce_(1, ids_N.expand_as(f_CN), f_CN.clamp_min(0), reduce="amax")
        kk = min(k, V)
        vals, idx = best_CV.topk(kk, dim=1)
        idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))
        if kk < k:
            idx = torch.cat([idx, idx.new_full((idx.shape[0], k - kk), -1)], dim=1)
        out.append(idx)
    return torch.cat(out)


@torch.no_grad()
def transfer_score(top_a_FK: Tensor, top_b_FK: Tensor) -> float:
    """Mean over feature indices f of the share of the K tokens of row f of `top_a_FK` that
    also appear in row f of `top_b_FK` (a multiset intersection, so a repeated id matches only
    as often as it occurs in both). Negative ids are padding and never match."""
    return float(shared_tokens(top_a_FK, top_b_FK).div(top_a_FK.shape[1]).mean())


@torch.no_grad()
def combined_transfer_score(parts: Sequence[tuple[Tensor, Tensor]]) -> float:
    """The paper's transfer score (Figure 6, §4.3: "the percentage of shared tokens across all
    three heuristics"): per feature index, the tokens shared over all parts (pairs of token
    tables, e.g. top logits, bottom logits, max-activating) divided by all their tokens, then
    the mean over features. Its code sums the three shared counts of 10 tokens each and divides
    by 30; with equal K per part this is the mean of the parts' `transfer_score`s."""
    if not parts:
        raise ValueError("no token tables to compare")
    shared_F = sum(shared_tokens(a, b) for a, b in parts)
    total = sum(a.shape[1] for a, _ in parts)
    return float((shared_F / total).mean())


@torch.no_grad()
def shared_tokens(top_a_FK: Tensor, top_b_FK: Tensor) -> Tensor:
    """Per row f [F] (float64): how many of the K tokens of row f of `top_a_FK` also appear in
    row f of `top_b_FK`, as a multiset intersection; negative ids (padding) never match."""
    if top_a_FK.shape != top_b_FK.shape:
        shapes = f"{tuple(top_a_FK.shape)} and {tuple(top_b_FK.shape)}"
        raise ValueError(f"token tables differ in shape: {shapes}")
    a = top_a_FK.long()
    b = top_b_FK.long().to(a.device)
    K = a.shape[1]
    # Position p of a row matches when fewer earlier copies of its id in a precede it than
    # there are copies in b: summed, that is sum_v min(count_a(v), count_b(v)).
    earlier_KK = torch.ones(K, K, dtype=torch.bool, device=a.device).tril(-1)
    rank_FK = ((a[:, :, None] == a[:, None, :]) & earlier_KK).sum(-1)
    in_b_FK = (a[:, :, None] == b[:, None, :]).sum(-1)
    matched_FK = (rank_FK < in_b_FK) & (a >= 0)
    return matched_FK.to(torch.float64).sum(1)
