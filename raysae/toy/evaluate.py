"""Measure the toy models: unigram baseline, held-out CE, contrastive tasks and a topic probe.

Works on any Hugging Face causal LM (loaded with `AutoModelForCausalLM` or freshly trained).
"""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa
import torch
from transformers import PreTrainedModel

from raysae.toy.language import Pos


class ProbeResult(NamedTuple):
    """Held-out accuracy of a linear topic probe on one residual-stream layer."""

    layer: int  # index into `output_hidden_states`: 0 = embeddings, i = after block i - 1
    accuracy: float
    chance: float  # share of the most frequent topic among the test tokens


def unigram_entropy(input_ids_NS: torch.Tensor) -> float:
    """Entropy in nats of the corpus's unigram distribution over predicted tokens (BOS excluded)."""
    counts = torch.bincount(input_ids_NS[:, 1:].flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def heldout_ce(model: PreTrainedModel, input_ids_NS: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy in nats over all positions of the rows."""
    total, n = 0.0, 0
    for start in range(0, len(input_ids_NS), batch_size):
        batch_BS = input_ids_NS[start : start + batch_size]
        logits_BSV = model(input_ids=batch_BS).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits_BSV.flatten(0, 1), batch_BS[:, 1:].flatten(), reduction="sum"
        ).item()
        n += batch_BS[:, 1:].numel()
    return total / n


@torch.no_grad()
def task_accuracy(model: PreTrainedModel, prompts: list[list[int]], correct: list[int],
                  wrong: list[int], pad_id: int) -> float:
    """Share of prompts where the model's next-token logit of `correct` beats that of `wrong`."""
    lengths_B = torch.tensor([len(p) for p in prompts])
    # right padding leaves a causal model's logits at the real positions unchanged
    ids_BS = torch.full((len(prompts), int(lengths_B.max())), pad_id)
    for i, p in enumerate(prompts):
        ids_BS[i, : len(p)] = torch.tensor(p)
    logits_BSV = model(input_ids=ids_BS).logits
    last_BV = logits_BSV[torch.arange(len(prompts)), lengths_B - 1]
    rows = torch.arange(len(prompts))
    diff_B = last_BV[rows, torch.tensor(correct)] - last_BV[rows, torch.tensor(wrong)]
    return float((diff_B > 0).float().mean())


def task_accuracies(model: PreTrainedModel, tasks: pa.Table, pad_id: int) -> dict[str, float]:
    """`task_accuracy` for every task of a tasks file (read with `pyarrow.parquet.read_table`)."""
    out = {}
    rows = tasks.to_pylist()
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        out[task] = task_accuracy(model, [r["prompt_ids"] for r in mine],
                                  [r["correct_id"] for r in mine], [r["wrong_id"] for r in mine],
                                  pad_id)
    return out


@torch.no_grad()
def hidden_states_NSD(model: PreTrainedModel, input_ids_NS: torch.Tensor, layer: int,
                      batch_size: int = 64) -> torch.Tensor:
    """The residual stream `output_hidden_states[layer]` for all rows."""
    chunks = [model(input_ids=input_ids_NS[s : s + batch_size], output_hidden_states=True)
              .hidden_states[layer].float() for s in range(0, len(input_ids_NS), batch_size)]
    return torch.cat(chunks)


def topic_known_NS(pos_NS: torch.Tensor, sent_pos_NS: torch.Tensor) -> torch.Tensor:
    """Tokens whose sentence topic the prefix determines: at or after its first topic word."""
    topic_pos = {int(Pos.NOUN), int(Pos.VERB), int(Pos.ADJ)}
    known_rows = []
    for pos_row, sent_pos_row in zip(pos_NS.tolist(), sent_pos_NS.tolist()):
        known, row = False, []
        for pos, sent_pos in zip(pos_row, sent_pos_row):
            known = (known and sent_pos > 0) or pos in topic_pos
            row.append(known)
        known_rows.append(row)
    return torch.tensor(known_rows, dtype=torch.bool)


def topic_probe(model: PreTrainedModel, input_ids_NS: torch.Tensor, topic_NS: torch.Tensor,
                layer: int, mask_NS: torch.Tensor | None = None, steps: int = 300) -> ProbeResult:
    """Fit a logistic-regression topic probe on the first half of the rows, test on the rest.

    Only tokens in `mask_NS` (default: every token with a topic) are used; `topic_known_NS` picks
    those whose topic the model can know, which is what a probe of its representation should ask.
    """
    acts_NSD = hidden_states_NSD(model, input_ids_NS, layer)
    half = len(input_ids_NS) // 2  # split by rows so no sequence is in both halves
    mask_NS = (topic_NS >= 0) if mask_NS is None else mask_NS & (topic_NS >= 0)
    x_train_TD, y_train_T = acts_NSD[:half][mask_NS[:half]], topic_NS[:half][mask_NS[:half]]
    x_test_TD, y_test_T = acts_NSD[half:][mask_NS[half:]], topic_NS[half:][mask_NS[half:]]
    mean_D, std_D = x_train_TD.mean(0), x_train_TD.std(0) + 1e-6
    x_train_TD, x_test_TD = (x_train_TD - mean_D) / std_D, (x_test_TD - mean_D) / std_D
    n_classes = int(topic_NS.max()) + 1
    with torch.enable_grad():
        W_DK = torch.zeros(acts_NSD.shape[-1], n_classes, requires_grad=True)
        b_K = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.Adam([W_DK, b_K], lr=0.05)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(x_train_TD @ W_DK + b_K, y_train_T.long())
            opt.zero_grad()
            (loss + 1e-4 * W_DK.square().sum()).backward()
            opt.step()
    pred_T = (x_test_TD @ W_DK + b_K).argmax(-1)
    chance = torch.bincount(y_test_T.long()).max().item() / len(y_test_T)
    return ProbeResult(layer, float((pred_T == y_test_T).float().mean()), chance)
