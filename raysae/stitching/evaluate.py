"""A stitch spliced between its two language models (pure torch): next-token CE of A, of B, of
each stitched model (A's stream mapped into B and back) and of the round trips, and each map's
reconstruction quality, on the same held-out tokens. The splice and CE arithmetic are the core's
(`raysae.evaluate`); what a stitch is and how its maps score are this study's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raysae.evaluate import next_token_stats, only_at
from raysae.models import hook_name, run_with_cache, splice
from raysae.stitching.stitch import Stitch, map_quality


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
                fn = only_at(keep_d, lambda _x, new=new, keep_d=keep_d: new[keep_d].to(_x.dtype))
                with splice(model, site, layer, fn):
                    logits = model(ids_d).logits
            ce, _, _ = next_token_stats(logits, ids_d, keep_d, None)
            sums[name] += float(ce)
    out = {f"ce/{k}": v / max(n_targets, 1) for k, v in sums.items()}
    quality = map_quality(stitch, torch.cat(xs_a), torch.cat(xs_b))
    return out | {f"map/{k}": v for k, v in quality.items()}
