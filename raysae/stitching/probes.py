"""Linear probes, sparse probes and steering vectors, read through a stitch from A to B.

What the stitch carries across is measured here (Chen et al. 2025, "transferring probes and
steering vectors"): a probe trained on A's residual stream is read on B through the down map
(`raysae.stitching.stitch.map_probe`), a sparse probe on the features of an SAE of A is read on B's
activations through the transferred SAE (`raysae.stitching.stitch.transfer_sae`), and a steering vector of
A is moved to B through the up map (`raysae.stitching.stitch.map_steering`). Each is scored next to what B
learns on its own and next to random and majority baselines.

Labelled tokens come either from per-token label columns beside `input_ids` (the toy corpus:
topic, number, depth) or from one label per text, applied to the text's last token.

Pure torch + `datasets`: no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysae.config import ConfigError, ProbeConfig
from raysae.models import hook_name, model_device, run_with_cache, splice
from raysae.sae import SAE
from raysae.stitching.stitch import Stitch, map_probe, map_steering, transfer_sae

# `datasets` builder of each local file suffix.
LOCAL_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
}
STEERING_SCALES = (0.5, 1.0, 2.0, 4.0)
"""Strengths tried for a unit steering vector, as multiples of B's mean residual norm."""
PROMPT_TOKENS = 4
"""Length of a steering prompt: the first tokens of a held-out row, BOS included."""
RANDOM_PROBE_SEEDS = 5
"""Random probes (and random steering directions) averaged into the `random` baselines."""

# The toy corpus's label conventions (raysae.toy.language): Number.SING, Number.PLUR, Pos.NONE.
_TOY_SING, _TOY_PLUR, _TOY_POS_NONE = 1, 2, 0


# ---------------------------------------------------------------------------------------------
# Labelled data


@dataclass
class LabelledTokens:
    """Token rows with integer class labels per token (-1 = unlabelled; pads are unlabelled)."""

    input_ids_NS: Tensor
    """Token ids [rows, seq] (int64), right-padded with the tokenizer's pad id."""
    labels: dict[str, Tensor]
    """Label column -> classes [rows, seq] (int64) in 0..K-1, -1 where unlabelled."""
    n_classes: dict[str, int]
    """Label column -> number of classes K."""
    class_values: dict[str, list[Any]] = field(default_factory=dict)
    """Label column -> the dataset's value of each class (class i is `class_values[c][i]`)."""
    lengths_N: Tensor | None = None
    """Real (unpadded) tokens per row; None means every row is full."""

    def row_lengths(self) -> Tensor:
        """Tokens per row before padding."""
        if self.lengths_N is not None:
            return self.lengths_N
        return torch.full((len(self.input_ids_NS),), self.input_ids_NS.shape[1], dtype=torch.long)


def _read_rows(source: str, split: str, num_rows: int) -> list[dict[str, Any]]:
    """The first `num_rows` rows of a local file (or folder of files) or a `datasets` hub name."""
    import datasets  # heavy import, only needed here

    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
        builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
        if not files or None in builders or len(builders) != 1:
            raise ConfigError(
                f"probes.source: {source!r} must be a file or folder of files of one kind among "
                f"{sorted(LOCAL_BUILDERS)}, got {sorted(p.suffix for p in files) or 'no files'}"
            )
        ds = datasets.load_dataset(
            builders.pop(), data_files=[str(p) for p in files], split="train", streaming=True
        )
    else:
        ds = datasets.load_dataset(source, split=split, streaming=True)
    # Streaming reads only the rows taken, never the whole dataset.
    return list(itertools.islice(ds, num_rows))


def check_probe_columns(cfg: ProbeConfig, columns: list[str] | None = None) -> None:
    """Raise ConfigError unless the probe data has a column for every label and the steering
    label. Without `columns`, read from the first row of a local source (`raysae check`: a hub
    name is left to the run, which needs the network)."""
    if columns is None:
        if not Path(cfg.source).exists():
            return
        columns = list(next(iter(_read_rows(cfg.source, cfg.split, 1)), {}))
    for name in dict.fromkeys((*cfg.labels, cfg.steering_label)):
        if name not in columns:
            role = "stitch.probes.steering_label" if name not in cfg.labels else "stitch.probes.labels: label"
            raise ConfigError(
                f"{role} {name!r} is not a column of {cfg.source!r}; expected a column of "
                f"integer classes (per token beside input_ids, or one per text); columns: {columns}"
            )


def _pad_id(tokenizer: Any | None) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _is_labelled(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return not math.isnan(value) and value >= 0
    return True


def _pad_rows(rows: list[list[int]], width: int, fill: int) -> Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _toy_rules(column: str, raw_NS: Tensor, rows: list[dict[str, Any]], width: int) -> Tensor:
    """The toy corpus's labelled tokens: a topic where the prefix determines it, number only
    for SING/PLUR, depth on every non-special token."""
    from raysae.toy import topic_known_NS

    pos_NS = _pad_rows([r["pos"][:width] for r in rows], width, _TOY_POS_NONE)
    if column == "topic":
        sent_pos_NS = _pad_rows([r["sent_pos"][:width] for r in rows], width, -1)
        return torch.where(topic_known_NS(pos_NS, sent_pos_NS) & (raw_NS >= 0), raw_NS, -1)
    if column == "number":
        return torch.where((raw_NS == _TOY_SING) | (raw_NS == _TOY_PLUR), raw_NS, -1)
    if column == "depth":
        return torch.where(pos_NS != _TOY_POS_NONE, raw_NS, -1)
    return raw_NS


def _classes_of_tokens(raw_NS: Tensor) -> tuple[Tensor, list[Any]]:
    """Non-negative values -> 0..K-1 in sorted order; everything else -> -1."""
    labelled = raw_NS >= 0
    values = torch.unique(raw_NS[labelled])  # sorted
    out = torch.full_like(raw_NS, -1)
    out[labelled] = torch.searchsorted(values, raw_NS[labelled])
    return out, values.tolist()


def _last_real_positions(ids_NS: Tensor, lengths_N: Tensor, special: set[int]) -> Tensor:
    """Index of each row's last non-special token (-1 when it has none)."""
    pos_N = torch.full((len(ids_NS),), -1, dtype=torch.long)
    for i, (row, n) in enumerate(zip(ids_NS.tolist(), lengths_N.tolist())):
        for j in range(n - 1, -1, -1):
            if row[j] not in special:
                pos_N[i] = j
                break
    return pos_N


def load_labelled(cfg: ProbeConfig, tokenizer: Any | None, context_length: int) -> LabelledTokens:
    """The first `cfg.num_rows` rows of `cfg.source` as labelled tokens.

    Rows with `input_ids` take their labels from list columns aligned with the tokens (a scalar
    column labels the row's last real token); rows without take `cfg.text_column`, tokenized
    and truncated to `context_length`, with one scalar label per text on its last real token.
    The columns read are `cfg.labels` and `cfg.steering_label`.
    """
    if context_length < 1:
        raise ValueError(f"context_length: got {context_length}, expected a positive integer")
    rows = _read_rows(cfg.source, cfg.split, cfg.num_rows)
    if len(rows) < 4:
        raise ValueError(f"probes.source: {cfg.source!r} has {len(rows)} rows, expected at least 4")
    columns = list(rows[0])
    check_probe_columns(cfg, columns)
    wanted = list(dict.fromkeys((*cfg.labels, cfg.steering_label)))
    token_rows = _token_rows(cfg, rows, columns, tokenizer, context_length)
    width = max(1, max(len(t) for t in token_rows))
    ids_NS = _pad_rows(token_rows, width, _pad_id(tokenizer))
    lengths_N = torch.tensor([len(t) for t in token_rows], dtype=torch.long)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    last_N = _last_real_positions(ids_NS, lengths_N, special)

    labels: dict[str, Tensor] = {}
    n_classes: dict[str, int] = {}
    class_values: dict[str, list[Any]] = {}
    for name in wanted:
        if isinstance(rows[0][name], list | tuple):
            classes_NS, values = _token_labels(name, rows, columns, lengths_N, width)
        else:
            classes_NS, values = _row_labels(name, rows, ids_NS, last_N)
        if len(values) < 2:
            raise ValueError(
                f"probes: label column {name!r} of {cfg.source!r} has {len(values)} class(es) "
                f"({values}) among its first {len(rows)} rows; expected at least 2"
            )
        labels[name], n_classes[name], class_values[name] = classes_NS, len(values), values
    return LabelledTokens(ids_NS, labels, n_classes, class_values, lengths_N)


def _token_rows(cfg: ProbeConfig, rows: list[dict], columns: list[str], tokenizer: Any | None,
                context_length: int) -> list[list[int]]:
    """Each row's token ids: its `input_ids`, or its text tokenized, cut to `context_length`."""
    if "input_ids" in columns:
        return [list(r["input_ids"])[:context_length] for r in rows]
    if cfg.text_column in columns:
        if tokenizer is None:
            raise ValueError(f"probes: {cfg.source!r} holds text, so a tokenizer is needed")
        return [tokenizer(r[cfg.text_column], truncation=True, max_length=context_length)["input_ids"]
                for r in rows]
    raise ValueError(
        f"probes.text_column: neither input_ids nor {cfg.text_column!r} is a column of "
        f"{cfg.source!r}; expected token ids or texts; columns: {columns}"
    )


def _token_labels(name: str, rows: list[dict], columns: list[str], lengths_N: Tensor,
                  width: int) -> tuple[Tensor, list[Any]]:
    """A list column: one label per token, aligned with `input_ids` (-1 past each row's end)."""
    if "input_ids" not in columns:
        raise ValueError(f"probes: label column {name!r} holds one label per token, "
                         "which needs an input_ids column to align with")
    real_NS = torch.arange(width) < lengths_N[:, None]
    raw_NS = _pad_rows([list(r[name])[:width] for r in rows], width, -1)
    raw_NS = torch.where(real_NS, raw_NS, -1)
    if "pos" in columns and "sent_pos" in columns:  # the toy corpus
        raw_NS = _toy_rules(name, raw_NS, rows, width)
    return _classes_of_tokens(raw_NS)


def _row_labels(name: str, rows: list[dict], ids_NS: Tensor, last_N: Tensor
                ) -> tuple[Tensor, list[Any]]:
    """A scalar column: one label per row, on the row's last real token."""
    per_row = [r[name] if _is_labelled(r[name]) else None for r in rows]
    values = sorted({v for v in per_row if v is not None})
    index = {v: i for i, v in enumerate(values)}
    classes_NS = torch.full_like(ids_NS, -1)
    for i, (v, j) in enumerate(zip(per_row, last_N.tolist())):
        if v is not None and j >= 0:
            classes_NS[i, j] = index[v]
    return classes_NS, values


# ---------------------------------------------------------------------------------------------
# Probes


@dataclass(frozen=True)
class LinearProbe:
    """A K-way linear readout of raw activations: logits = x W + b."""

    W_DK: Tensor
    b_K: Tensor

    def logits(self, x_ND: Tensor) -> Tensor:
        return x_ND.to(self.W_DK) @ self.W_DK + self.b_K

    def predict(self, x_ND: Tensor) -> Tensor:
        return self.logits(x_ND).argmax(-1)


def fit_probe(
    x_ND: Tensor, y_N: Tensor, n_classes: int, steps: int = 300, l2: float = 1e-4, seed: int = 0
) -> LinearProbe:
    """Multinomial logistic regression (L-BFGS from zero weights, so deterministic) on
    standardised inputs, with the standardisation folded into W and b so that the probe reads
    raw activations: only a raw-input affine probe composes with a stitch's down map.
    The problem is convex and starts from zero, so `seed` changes nothing; it is kept so every
    fitter has the same signature."""
    del seed
    if len(x_ND) == 0:
        raise ValueError("fit_probe: no training tokens")
    x_ND, y_N = x_ND.detach().float(), y_N.detach().long().to(x_ND.device)
    mu_D = x_ND.mean(0)
    sd_D = x_ND.std(0, unbiased=False)
    # Constant features keep scale 1 (as sklearn's StandardScaler does) instead of blowing up.
    sd_D = torch.where(sd_D > 1e-6 * sd_D.max().clamp_min(1e-30), sd_D, torch.ones_like(sd_D))
    z_ND = (x_ND - mu_D) / sd_D
    W_DK = torch.zeros(x_ND.shape[1], n_classes, device=x_ND.device, requires_grad=True)
    b_K = torch.zeros(n_classes, device=x_ND.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W_DK, b_K], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z_ND @ W_DK + b_K, y_N) + l2 * W_DK.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W_DK, b_K = W_DK.detach(), b_K.detach()
    return LinearProbe(W_DK / sd_D[:, None], b_K - (mu_D / sd_D) @ W_DK)


def accuracy(probe: LinearProbe, x_ND: Tensor, y_N: Tensor) -> float:
    """Share of rows whose argmax logit is the label (nan for no rows)."""
    if len(y_N) == 0:
        return math.nan
    return float((probe.predict(x_ND).cpu() == y_N.cpu()).float().mean())


def random_probe(d: int, n_classes: int, seed: int) -> LinearProbe:
    """A baseline probe with N(0, 1/d) weights and zero biases."""
    gen = torch.Generator().manual_seed(seed)
    return LinearProbe(torch.randn(d, n_classes, generator=gen) / math.sqrt(d), torch.zeros(n_classes))


def majority_rate(y_N: Tensor) -> float:
    """Share of the most frequent class (nan for no rows)."""
    if len(y_N) == 0:
        return math.nan
    return float(torch.bincount(y_N.long()).max()) / len(y_N)


def top_class_mean_features(feats_NF: Tensor, y_N: Tensor, n_classes: int, k: int) -> Tensor:
    """The k features whose mean differs most between a class and the rest of the tokens:
    score_f = max_c |mean(f | y = c) - mean(f | y != c)|, highest first (ties by index)."""
    if not 1 <= k <= feats_NF.shape[1]:
        raise ValueError(f"top_class_mean_features: k={k}, expected 1..{feats_NF.shape[1]}")
    f_NF, y_N = feats_NF.float(), y_N.to(feats_NF.device)
    score_F = torch.zeros(f_NF.shape[1], device=f_NF.device)
    for c in range(n_classes):
        inside_N = y_N == c
        if inside_N.all() or not inside_N.any():
            continue  # a class that is all or none of the tokens separates nothing
        diff_F = (f_NF[inside_N].mean(0) - f_NF[~inside_N].mean(0)).abs()
        score_F = torch.maximum(score_F, diff_F)
    return torch.argsort(score_F, descending=True, stable=True)[:k].cpu()


# ---------------------------------------------------------------------------------------------
# Steering


def diff_of_means(x_ND: Tensor, y_N: Tensor, target: int) -> Tensor:
    """Mean over tokens of class `target` minus mean over the other labelled tokens (y >= 0)."""
    y_N = y_N.to(x_ND.device)
    inside_N, outside_N = y_N == target, (y_N >= 0) & (y_N != target)
    if not inside_N.any() or not outside_N.any():
        raise ValueError(
            f"diff_of_means: class {target} has {int(inside_N.sum())} tokens and the other "
            f"classes {int(outside_N.sum())}; expected both to be non-empty"
        )
    x_ND = x_ND.float()
    return x_ND[inside_N].mean(0) - x_ND[outside_N].mean(0)


def target_tokens(
    input_ids_NS: Tensor,
    labels_NS: Tensor,
    target: int,
    purity: float = 0.9,
    min_count: int = 5,
    exclude: Sequence[int] | Tensor = (),
) -> Tensor:
    """Token ids seen labelled at least `min_count` times, at least `purity` of them in class
    `target`: the words of a topic, on the toy corpus. Sorted; `exclude` (special ids) never."""
    labelled = labels_NS >= 0
    ids_T, y_T = input_ids_NS[labelled].long(), labels_NS[labelled]
    vocab = int(input_ids_NS.max()) + 1
    total_V = torch.bincount(ids_T, minlength=vocab).double()
    hits_V = torch.bincount(ids_T[y_T == target], minlength=vocab).double()
    keep_V = (total_V >= min_count) & (hits_V >= purity * total_V - 1e-9)
    exclude = torch.as_tensor(exclude, dtype=torch.long)
    keep_V[exclude[exclude < vocab]] = False
    return keep_V.nonzero().flatten()


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts_NT: Tensor,
    n_new: int,
    site: str,
    layer: int,
    vector_D: Tensor | None = None,
    strength: float = 0.0,
) -> Tensor:
    """Greedy continuations [N, n_new]; with a vector, strength * vector is added to the
    residual at (site, layer) at every position of every forward pass."""
    device = model_device(model)
    ids_NT = prompts_NT.to(device)
    steer = contextlib.nullcontext()
    if vector_D is not None:
        add_D = (strength * vector_D.float()).to(device)
        steer = splice(model, site, layer, lambda x: x + add_D.to(x.dtype))
    with steer:
        for _ in range(n_new):
            # No KV cache: every position is recomputed, so every one of them is steered.
            logits_NV = model(input_ids=ids_NT, use_cache=False).logits[:, -1]
            ids_NT = torch.cat([ids_NT, logits_NV.argmax(-1, keepdim=True)], dim=1)
    return ids_NT[:, prompts_NT.shape[1] :].cpu()


def success_rate(generated_NM: Tensor, target_ids: Tensor) -> float:
    """Share of generated tokens that are in the target set."""
    return float(torch.isin(generated_NM.cpu(), target_ids.cpu()).float().mean())


def choose_strength(
    model: nn.Module,
    prompts_NT: Tensor,
    site: str,
    layer: int,
    v_unit_D: Tensor,
    target_ids: Tensor,
    scales: Sequence[float] = STEERING_SCALES,
    n_new: int = 12,
    ref_norm: float = 1.0,
) -> float:
    """The strength s * ref_norm, s in `scales`, with the best success on these (calibration)
    prompts; the first scale listed wins a tie."""
    best, best_success = scales[0] * ref_norm, -1.0
    for s in scales:
        strength = s * ref_norm
        out = generate(model, prompts_NT, n_new, site, layer, v_unit_D, strength)
        success = success_rate(out, target_ids)
        if success > best_success:
            best, best_success = strength, success
    return best


# ---------------------------------------------------------------------------------------------
# The sweep's entry point


@torch.no_grad()
def _gather(
    model: nn.Module, ids_NS: Tensor, keep_NS: Tensor, site: str, layer: int, batch_size: int = 32
) -> Tensor:
    """Activations [T, D] (float32, CPU) of the kept tokens, rows in order."""
    name, device, out = hook_name(site, layer), model_device(model), []
    for s in range(0, len(ids_NS), batch_size):
        # Right padding: a causal model's activations at real positions ignore the pads.
        acts_BSD = run_with_cache(model, ids_NS[s : s + batch_size].to(device), [(site, layer)])[name]
        out.append(acts_BSD[keep_NS[s : s + batch_size].to(device)].float().cpu())
    return torch.cat(out).clone()  # a normal tensor: run_with_cache returns inference tensors


@torch.no_grad()
def _encode(sae: SAE, x_ND: Tensor, chunk: int = 4096) -> Tensor:
    p = next(sae.parameters())
    return torch.cat([
        sae.encode(x_ND[i : i + chunk].to(p.device, p.dtype)).float().cpu()
        for i in range(0, len(x_ND), chunk)
    ])


def _unit(v_D: Tensor) -> Tensor:
    return v_D / v_D.norm().clamp_min(1e-12)


def _probe_metrics(
    label: str, a_TD: Tensor, b_TD: Tensor, y_T: Tensor, train_T: Tensor, test_T: Tensor,
    n_classes: int, stitch: Stitch,
) -> dict[str, float]:
    """Dense probes: A on A, A's probe on B through the stitch, B on B, random, majority."""
    y_tr, y_te = y_T[train_T], y_T[test_T]
    probe_a = fit_probe(a_TD[train_T], y_tr, n_classes)
    W_BK, b_K = map_probe(probe_a.W_DK, probe_a.b_K, stitch)
    mapped = LinearProbe(W_BK.detach().float().cpu(), b_K.detach().float().cpu())
    probe_b = fit_probe(b_TD[train_T], y_tr, n_classes)
    d_b = b_TD.shape[1]
    rand = [accuracy(random_probe(d_b, n_classes, s), b_TD[test_T], y_te)
            for s in range(RANDOM_PROBE_SEEDS)]
    return {
        f"probe/{label}/a_on_a": accuracy(probe_a, a_TD[test_T], y_te),
        f"probe/{label}/a_on_b": accuracy(mapped, b_TD[test_T], y_te),
        f"probe/{label}/b_on_b": accuracy(probe_b, b_TD[test_T], y_te),
        f"probe/{label}/random": sum(rand) / len(rand),
        f"probe/{label}/majority": majority_rate(y_te),
    }


def _sparse_probe_metrics(
    label: str, feats: dict[int, tuple[Tensor, Tensor]], y_T: Tensor, train_T: Tensor,
    test_T: Tensor, n_classes: int, ks: Sequence[int],
) -> dict[str, float]:
    """Sparse probes on the top-k features of A's SAE on A, and of its transfer on B."""
    out = {}
    y_tr, y_te = y_T[train_T], y_T[test_T]
    for width, (fa_TF, fb_TF) in feats.items():
        for k in ks:
            if k > width:
                continue
            key = f"sparse_probe/{label}/w{width}/k{k}"
            idx_a = top_class_mean_features(fa_TF[train_T], y_tr, n_classes, k)
            probe_a = fit_probe(fa_TF[train_T][:, idx_a], y_tr, n_classes)
            idx_b = top_class_mean_features(fb_TF[train_T], y_tr, n_classes, k)
            probe_b = fit_probe(fb_TF[train_T][:, idx_b], y_tr, n_classes)
            out[f"{key}/a_on_a"] = accuracy(probe_a, fa_TF[test_T][:, idx_a], y_te)
            out[f"{key}/a_on_b"] = accuracy(probe_a, fb_TF[test_T][:, idx_a], y_te)
            out[f"{key}/b_on_b"] = accuracy(probe_b, fb_TF[test_T][:, idx_b], y_te)
    return out


def _steering_metrics(
    model_b: nn.Module, stitch: Stitch, site: str, layer_b: int, a_TD: Tensor, b_TD: Tensor,
    y_T: Tensor, train_T: Tensor, data: LabelledTokens, label: str, cfg: ProbeConfig,
    special_ids: Sequence[int],
) -> dict[str, float]:
    """B steered toward `cfg.steering_target` by its own, A's mapped and a random vector, each
    at the strength that does best on calibration prompts, scored on other prompts."""
    target, n_classes = cfg.steering_target, data.n_classes[label]
    if not 0 <= target < n_classes:
        raise ValueError(f"probes.steering_target: got {target}, expected a class of {label!r} "
                         f"in 0..{n_classes - 1} (values {data.class_values.get(label)})")
    gen = torch.Generator().manual_seed(0)
    vectors = {
        "b_own": _unit(diff_of_means(b_TD[train_T], y_T[train_T], target)),
        "a_mapped": map_steering(diff_of_means(a_TD[train_T], y_T[train_T], target), stitch)
        .detach().float().cpu(),
    }
    # random directions: the mean over several, as at high strength any single direction can
    # collapse generation onto one token that happens to be a target word
    randoms = {f"random{i}": _unit(torch.randn(b_TD.shape[1], generator=gen))
               for i in range(RANDOM_PROBE_SEEDS)}
    vectors |= randoms
    target_ids = target_tokens(data.input_ids_NS, data.labels[label], target, exclude=special_ids)
    ref_norm = float(b_TD.norm(dim=1).mean())

    half = len(data.input_ids_NS) // 2
    test_rows = data.input_ids_NS[half:]
    n_prompt = max(1, min(PROMPT_TOKENS, int(data.row_lengths()[half:].min())))
    n_calib = len(test_rows) // 2
    calib_NT, score_NT = test_rows[:n_calib, :n_prompt], test_rows[n_calib:, :n_prompt]
    n_new = cfg.steering_tokens

    unsteered = generate(model_b, score_NT, n_new, site, layer_b)
    out = {
        "steering/unsteered/success": success_rate(unsteered, target_ids),
        "steering/cosine_a_mapped_b_own": float(vectors["a_mapped"] @ vectors["b_own"]),
        "steering/target_tokens": float(len(target_ids)),
    }
    for name, v_D in vectors.items():
        strength = choose_strength(model_b, calib_NT, site, layer_b, v_D, target_ids,
                                   n_new=n_new, ref_norm=ref_norm)
        steered = generate(model_b, score_NT, n_new, site, layer_b, v_D, strength)
        out[f"steering/{name}/success"] = success_rate(steered, target_ids)
        out[f"steering/{name}/strength"] = strength
    for metric in ("success", "strength"):
        values = [out.pop(f"steering/{name}/{metric}") for name in randoms]
        out[f"steering/random/{metric}"] = sum(values) / len(values)
    return out


@torch.no_grad()
def probe_and_steer(
    model_a: nn.Module,
    model_b: nn.Module,
    stitch: Stitch,
    site: str,
    layer_a: int,
    layer_b: int,
    data: LabelledTokens,
    cfg: ProbeConfig,
    saes_a: dict[int, SAE] | None,
    special_ids: Sequence[int],
) -> dict[str, float]:
    """Probe, sparse-probe and steering metrics of one stitch at (site, layer_a -> layer_b).

    Activations of A and B are taken on the same tokens (special and pad tokens masked out);
    the first half of the rows trains, the second half tests. Steering prompts are the first
    tokens of the test rows: half choose each vector's strength, the other half score it.
    """
    labels = list(dict.fromkeys((*cfg.labels, cfg.steering_label)))
    for name in labels:
        if name not in data.labels:
            raise ValueError(f"probes: label {name!r} was not loaded; loaded: {sorted(data.labels)}")
    ids_NS = data.input_ids_NS
    real_NS = torch.arange(ids_NS.shape[1]) < data.row_lengths()[:, None]
    labelled_NS = torch.stack([data.labels[n] >= 0 for n in labels]).any(0)
    special_T = torch.as_tensor(list(special_ids), dtype=torch.long)
    keep_NS = real_NS & labelled_NS & ~torch.isin(ids_NS, special_T)
    if not keep_NS.any():
        raise ValueError("probes: no labelled non-special tokens")

    a_TD = _gather(model_a, ids_NS, keep_NS, site, layer_a)
    b_TD = _gather(model_b, ids_NS, keep_NS, site, layer_b)
    is_train_T = keep_NS.nonzero()[:, 0] < len(ids_NS) // 2

    feats: dict[int, tuple[Tensor, Tensor]] = {}
    for sae in (saes_a or {}).values():
        feats[sae.d_sae] = (_encode(sae, a_TD), _encode(transfer_sae(sae, stitch), b_TD))

    out: dict[str, float] = {}
    for name in cfg.labels:
        y_T = data.labels[name][keep_NS]
        train_T, test_T = (y_T >= 0) & is_train_T, (y_T >= 0) & ~is_train_T
        if not train_T.any() or not test_T.any():
            raise ValueError(f"probes: label {name!r} has {int(train_T.sum())} train and "
                             f"{int(test_T.sum())} test tokens; expected both to be non-empty")
        k = data.n_classes[name]
        out |= _probe_metrics(name, a_TD, b_TD, y_T, train_T, test_T, k, stitch)
        out |= _sparse_probe_metrics(name, feats, y_T, train_T, test_T, k, cfg.sparse_k)

    y_T = data.labels[cfg.steering_label][keep_NS]
    out |= _steering_metrics(model_b, stitch, site, layer_b, a_TD, b_TD, y_T,
                             (y_T >= 0) & is_train_T, data, cfg.steering_label, cfg, special_ids)
    return out
