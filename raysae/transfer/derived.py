"""What the sweep derives for a finished transfer SAE_{i<-j}, beside its own training metrics:
its normalized CES at every evaluated step, the MMCS of its decoder with the scratch SAE of
layer i, and the transfer scores of Figure 6 against its source SAE, read on held-out tokens
(`raysae.transfer.scores` holds the formulas). Pure torch: no ray, no mlflow.
"""

from __future__ import annotations

import torch

from raysae.activations import heldout_tokens, special_token_ids
from raysae.config import JobConfig
from raysae.features.attribution import NormFrame
from raysae.models import hook_name, load_tokenizer, run_with_cache
from raysae.sae import SAE
from raysae.transfer import scores
from raysae.transfer.grid import Trial

TOP_K_TOKENS = 10
"""Tokens per feature compared by the transfer score (top/bottom logits, max-activating)."""
SCORE_TOKENS = 16384
"""Held-out tokens the max-activating transfer score reads (its activations at every layer of
the sweep are held at once: 16k x 768 x 12 x 4 bytes = 600 MB at Pythia-160M)."""

Heldout = tuple[dict[int, torch.Tensor], torch.Tensor]
"""Held-out activations by layer ([N, d]) and their token ids ([N])."""


def new_normalized_ces(ces_by_step: list[tuple[int, float]], logged: set[int],
                       ces_zero_shot: float, ces_scratch: float) -> list[tuple[int, float]]:
    """(step, normalized CES) of each evaluated step (`eval/ces` by step, in order) not in
    `logged`."""
    return [(step, scores.normalized_ces(ces, ces_zero_shot, ces_scratch))
            for step, ces in ces_by_step if step not in logged]


@torch.no_grad()
def heldout_sites(job: JobConfig, model: torch.nn.Module, layers: list[int]) -> Heldout:
    """Activations of (at most SCORE_TOKENS of) the held-out tokens at the sweep's site of each
    layer ([N, d], special tokens dropped) and their token ids: where the max-activating tokens
    are read. One forward, in batches of `cache.batch_size` sequences."""
    assert job.sweep is not None
    tokens = heldout_tokens(job)
    tokens = tokens[: max(1, SCORE_TOKENS // tokens.shape[1])]
    special = torch.tensor(special_token_ids(job.model, load_tokenizer(job.model, job.data)))
    keep = ~torch.isin(tokens, special).reshape(-1)
    sites = [(job.sweep.site, layer) for layer in layers]
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for s in range(0, len(tokens), job.cache.batch_size):
        acts = run_with_cache(model, tokens[s : s + job.cache.batch_size], sites)
        for site, layer in zip(sites, layers):
            parts[layer].append(acts[hook_name(*site)].reshape(-1, acts[hook_name(*site)].shape[-1]))
    by_layer = {layer: torch.cat(xs)[keep].float() for layer, xs in parts.items()}
    return by_layer, tokens.reshape(-1)[keep]


@torch.no_grad()
def transfer_scores(
    source: SAE,
    transferred: SAE,
    trial: Trial,
    W_U_DV: torch.Tensor,
    heldout: Heldout,
    frame: NormFrame | None = None,
) -> dict[str, float]:
    """Figure 6: shared top-logit, bottom-logit and max-activating tokens (on held-out tokens)
    per feature index between the source SAE (on its layer) and the transferred one (on the
    target layer), each part and the three combined (the paper's score). Logit tokens read
    the decoder rows through the final norm's `frame` (γ and centring, as the DLA)."""
    k = TOP_K_TOKENS

    def logits(sae: SAE, largest: bool) -> torch.Tensor:
        return scores.top_logit_tokens(sae.W_dec, W_U_DV, k, largest=largest, frame=frame)

    acts, ids = heldout
    parts = {
        "top_logits": (logits(source, True), logits(transferred, True)),
        "bottom_logits": (logits(source, False), logits(transferred, False)),
        "max_activating": tuple(
            scores.max_activating_tokens(sae.encode(acts[layer]), ids, k)
            for sae, layer in ((source, trial.source_layer), (transferred, trial.layer))
        ),
    }
    out = {f"transfer_score/{name}": scores.transfer_score(*pair) for name, pair in parts.items()}
    out["transfer_score/combined"] = scores.combined_transfer_score(list(parts.values()))
    return out
