"""Task circuits of SAE features: attribution patching, faithfulness, completeness and direct
logit attribution (the layer-transfer paper's feature evaluation, its §3 and Appendices A-B,
after Marks et al. 2024). Pure torch: no ray, no mlflow.

A task is a set of contrastive examples (`raysae.features.tasks.TaskSet`): a clean prompt, a
counterfactual prompt of the same length, and two answer tokens. The metric is the logit
difference m = logit[correct] - logit[wrong] at the last prompt position.

Conventions, fixed here once:
- The SAE is spliced at (site, layer) with its error term kept: at every real prompt position
  (inside the prompt, not a special token) the stream x becomes decode(f) + ε, with
  f = encode(x) and ε = x - decode(f) taken from the run itself, so the splice leaves the
  model's output unchanged. Interventions edit f only; ε stays at its clean value, so every
  metric below is about the SAE's features and nothing else.
- Indirect effect by attribution patching (eq. 10): per example and feature,
  IE_i = Σ_t ∂m/∂f_{t,i}|clean · (f^cf_{t,i} - f_{t,i}), one clean forward and backward and one
  counterfactual forward, summed over prompt positions (features are the nodes, as in the
  paper, where N counts features). `exact_effects` is the same quantity by activation patching.
- A circuit C of N features is chosen per example (the paper's footnote 6): the N features of
  largest |IE|. Features outside C are mean-ablated (their mean activation over the real
  positions of the task's clean prompts). Faithfulness = (m(C) - m(∅)) / (m(M) - m(∅)) (eq. 8)
  with m(M) the model and m(∅) every feature mean-ablated; completeness uses m(M \\ C), i.e. C
  mean-ablated and the rest kept. m is averaged over examples before the ratio. By
  construction the full feature set has faithfulness 1 and the empty set 0. The ratio is
  ill-conditioned when mean-ablating every feature barely moves m (the task's signal then runs
  through the error term or is not at this site); below a set share of |m(M)| it is NaN.
- Direct logit attribution (Appendix B, eq. 11): attr_i = f_i (C(W_dec[i]) ⊙ γ) ·
  (W_U[correct] - W_U[wrong]) / σ at the last prompt position, the final norm's scale σ frozen
  at its actual value (`features.attribution`): feature i's direct share of m. Per example it
  is summed over features (`dla/<task>/total`) and averaged over the features active at the
  answer position (`dla/<task>/mean_active`, the paper's "feature averaged DLA" of Figure 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from raysae.features.attribution import direct_attribution, norm_frame
from raysae.features.tasks import TaskSet, logit_diff
from raysae.models import final_norm, get_blocks, hook_name, model_device, run_with_cache, splice
from raysae.sae import SAE

Edit = Callable[[Tensor, Tensor], Tensor]
"""(f_tF at the real positions of a batch, example index of each row) -> the features to decode."""


def resolve_n(top_n: Sequence[float], d_sae: int) -> list[int]:
    """Circuit sizes as feature counts: a value in (0, 1) is a fraction of d_sae (the paper's
    2%-8%) rounded to the nearest count, half up (not Python's half-to-even), at least 1; a
    value >= 1 is a count, at most d_sae (a larger one is refused, never cut to d_sae).
    Sorted, no repeats. At d_sae 6144, 2%-8% give 123,
    246, 369, 492: the paper's §2.3 lists 368 for 6% (its code hard-codes the four counts), so
    its config gives counts."""
    out = set()
    for v in top_n:
        if v <= 0:
            raise ValueError(f"circuit size {v}: expected a fraction in (0, 1) or a count >= 1")
        if v > d_sae:
            raise ValueError(f"circuit size {v}: a feature count above d_sae ({d_sae})")
        out.add(max(1, math.floor(v * d_sae + 0.5)) if v < 1 else int(v))
    return sorted(out)


def prompt_mask(task: TaskSet, special_ids: Sequence[int] = ()) -> Tensor:
    """[N, T] bool: positions inside each prompt that are not special tokens (BOS): where the
    SAE is spliced, as in `evaluate.evaluate_sae`."""
    N, T = task.clean_NT.shape
    inside = torch.arange(T)[None, :] < task.lengths_N[:, None]
    return inside & ~torch.isin(task.clean_NT, torch.tensor(list(special_ids), dtype=torch.long))


def run_with_features(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    ids_BT: Tensor,
    mask_BT: Tensor,
    edit: Edit | None = None,
) -> Tensor:
    """Logits [B, T, V] with the SAE spliced at (site, layer) and its clean error term kept:
    x -> decode(edit(f, rows)) + (x - decode(f)) at the `mask_BT` positions (rows: each masked
    position's example index within the batch). `edit=None` keeps f: the model's own output."""
    dev = model_device(model)
    mask = mask_BT.to(dev)
    rows_t = mask.nonzero()[:, 0]

    def fn(x_BTD: Tensor) -> Tensor:
        x_tD = x_BTD[mask].to(sae.W_enc.dtype)
        f_tF = sae.encode(x_tD)
        err_tD = (x_tD - sae.decode(f_tF)).detach()
        new_tF = f_tF if edit is None else edit(f_tF, rows_t)
        out = x_BTD.clone()
        out[mask] = (sae.decode(new_tF) + err_tD).to(x_BTD.dtype)
        return out

    with splice(model, site, layer, fn):
        return model(input_ids=ids_BT.to(dev)).logits


class _Batch(NamedTuple):
    start: int
    clean_BT: Tensor
    counter_BT: Tensor
    mask_BT: Tensor
    lengths_B: Tensor
    correct_B: Tensor
    wrong_B: Tensor


def _batches(task: TaskSet, mask_NT: Tensor, batch_size: int) -> Iterator[_Batch]:
    for s in range(0, len(task), batch_size):
        sl = slice(s, s + batch_size)
        yield _Batch(s, task.clean_NT[sl], task.counter_NT[sl], mask_NT[sl], task.lengths_N[sl],
                     task.correct_N[sl], task.wrong_N[sl])


def _m(model: nn.Module, sae: SAE, site: str, layer: int, b: _Batch, edit: Edit | None) -> Tensor:
    """m [B] of a batch with the features edited (None: the model's own m)."""
    logits = run_with_features(model, sae, site, layer, b.clean_BT, b.mask_BT, edit)
    return logit_diff(logits, b.lengths_B, b.correct_B, b.wrong_B)


@dataclass(frozen=True)
class Patching:
    """Attribution patching of one task: the effects and what the ablations need."""

    ie_NF: Tensor
    """IE_AtP of every feature on every example, summed over prompt positions (float32, CPU)."""
    m_clean_N: Tensor
    """m of the model (the SAE spliced with its error term) per example."""
    mean_F: Tensor
    """Mean activation of each feature over the real positions of the clean prompts."""


def attribution_patching(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    task: TaskSet,
    special_ids: Sequence[int] = (),
    batch_size: int = 16,
) -> Patching:
    """IE_AtP (eq. 10) of every feature on every example: two forwards and one backward per
    batch. Gradients are taken with `torch.autograd.grad` on the features only (no parameter
    .grad is touched)."""
    mask_NT = prompt_mask(task, special_ids)
    sae_dev = sae.W_dec.device
    ies, ms = [], []
    f_sum_F = torch.zeros(sae.d_sae, dtype=torch.float64)
    n_pos = 0
    for b in _batches(task, mask_NT, batch_size):
        leaf: list[Tensor] = []

        def keep_leaf(f_tF: Tensor, _rows: Tensor, leaf: list[Tensor] = leaf) -> Tensor:
            f = f_tF.detach().requires_grad_(True)
            leaf.append(f)
            return f

        with torch.enable_grad():
            m_B = _m(model, sae, site, layer, b, keep_leaf)
            (grad_tF,) = torch.autograd.grad(m_B.sum(), leaf[0])
        f_cf_tF = _counter_features(model, sae, site, layer, b)
        f_tF = leaf[0].detach()
        rows_t = b.mask_BT.nonzero()[:, 0].to(sae_dev)
        ie_BF = torch.zeros(len(b.clean_BT), sae.d_sae, dtype=torch.float64, device=sae_dev)
        ie_BF.index_add_(0, rows_t, (grad_tF * (f_cf_tF - f_tF)).double())
        ies.append(ie_BF.float().cpu())
        ms.append(m_B.detach().float().cpu())
        f_sum_F += f_tF.double().sum(0).cpu()
        n_pos += len(f_tF)
    return Patching(torch.cat(ies), torch.cat(ms), (f_sum_F / max(n_pos, 1)).float())


@torch.inference_mode()
def exact_effects(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    task: TaskSet,
    features: Sequence[int],
    special_ids: Sequence[int] = (),
    batch_size: int = 16,
) -> Tensor:
    """IE [N, K] by activation patching (eq. 7): m with feature k set to its counterfactual
    values at every prompt position (error term and other features clean) minus m clean. One
    forward per feature and batch: the reference `attribution_patching` approximates."""
    mask_NT = prompt_mask(task, special_ids)
    out = []
    for b in _batches(task, mask_NT, batch_size):
        f_cf_tF = _counter_features(model, sae, site, layer, b)
        base_B = _m(model, sae, site, layer, b, None)
        cols = []
        for k in features:

            def patch(f_tF: Tensor, _rows: Tensor, k: int = k, f_cf_tF: Tensor = f_cf_tF) -> Tensor:
                f = f_tF.clone()
                f[:, k] = f_cf_tF[:, k]
                return f

            cols.append(_m(model, sae, site, layer, b, patch) - base_B)
        out.append(torch.stack(cols, 1).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def _counter_features(model: nn.Module, sae: SAE, site: str, layer: int, b: _Batch) -> Tensor:
    """f at the masked positions of the counterfactual prompts [t, F]."""
    x_BTD = run_with_cache(model, b.counter_BT.to(model_device(model)), [(site, layer)])[
        hook_name(site, layer)
    ]
    x_tD = x_BTD[b.mask_BT.to(x_BTD.device)]
    return sae.encode(x_tD.to(sae.W_dec.device, sae.W_enc.dtype))


class Ablations(NamedTuple):
    """Mean m over a task's examples under each ablation."""

    model: float
    """m(M): every feature kept (the model's own m)."""
    empty: float
    """m(∅): every feature mean-ablated."""
    circuit: dict[int, float]
    """m(C) per circuit size N: C kept, the rest mean-ablated."""
    complement: dict[int, float]
    """m(M \\ C) per circuit size N: C mean-ablated, the rest kept."""


@torch.inference_mode()
def ablation_means(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    task: TaskSet,
    patching: Patching,
    sizes: Sequence[int],
    special_ids: Sequence[int] = (),
    batch_size: int = 16,
    complement_sizes: Sequence[int] | None = None,
) -> Ablations:
    """Mean m over examples for the model, the empty circuit, per size N of `sizes` the circuit
    (the N largest |IE| kept, the rest mean-ablated), and per size N of `complement_sizes`
    (default: `sizes`) its complement (those N mean-ablated)."""
    comp = list(sizes if complement_sizes is None else complement_sizes)
    mask_NT = prompt_mask(task, special_ids)
    sae_dev = sae.W_dec.device
    mean_F = patching.mean_F.to(sae_dev, sae.W_enc.dtype)
    order_NF = patching.ie_NF.abs().argsort(dim=1, descending=True, stable=True)
    sums = {"model": 0.0, "empty": 0.0} | {("C", n): 0.0 for n in sizes} | {
        ("M-C", n): 0.0 for n in comp
    }
    for b in _batches(task, mask_NT, batch_size):

        def m_sum(edit: Edit | None, b: _Batch = b) -> float:
            return float(_m(model, sae, site, layer, b, edit).sum())

        sums["model"] += m_sum(None)
        sums["empty"] += m_sum(lambda f, _r: mean_F.expand_as(f))
        order_BF = order_NF[b.start : b.start + len(b.clean_BT)].to(sae_dev)
        for n in sorted({*sizes, *comp}):
            in_c_BF = torch.zeros(order_BF.shape, dtype=torch.bool, device=sae_dev)
            in_c_BF.scatter_(1, order_BF[:, :n], True)
            if ("C", n) in sums:
                sums[("C", n)] += m_sum(lambda f, r, c=in_c_BF: torch.where(c[r], f, mean_F))
            if ("M-C", n) in sums:
                sums[("M-C", n)] += m_sum(lambda f, r, c=in_c_BF: torch.where(c[r], mean_F, f))
    N = max(len(task), 1)
    return Ablations(
        model=sums["model"] / N,
        empty=sums["empty"] / N,
        circuit={n: sums[("C", n)] / N for n in sizes},
        complement={n: sums[("M-C", n)] / N for n in comp},
    )


def normalised(m: float, m_model: float, m_empty: float, min_effect: float = 0.0) -> float:
    """(m - m(∅)) / (m(M) - m(∅)) (eq. 8). NaN when the features' whole effect is too small
    for the ratio to mean anything: |m(M) - m(∅)| <= min_effect · |m(M)| (and always when it
    is 0), i.e. mean-ablating every feature barely moves m."""
    denom = m_model - m_empty
    if denom == 0 or abs(denom) <= min_effect * abs(m_model):
        return float("nan")
    return (m - m_empty) / denom


@torch.inference_mode()
def task_dla(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    task: TaskSet,
    batch_size: int = 16,
) -> Tensor:
    """Direct logit attribution [N, F] of every feature to m at each prompt's last position
    (Appendix B, eq. 11; see the module docstring)."""
    last = len(get_blocks(model)) - 1
    names = hook_name(site, layer), hook_name("resid_post", last)
    norm, W_U_VD = final_norm(model), model.get_output_embeddings().weight
    dev, sae_dev = model_device(model), sae.W_dec.device
    out = []
    for s in range(0, len(task), batch_size):
        ids = task.clean_NT[s : s + batch_size].to(dev)
        pos_B = task.lengths_N[s : s + batch_size].to(dev) - 1
        cache = run_with_cache(model, ids, [(site, layer), ("resid_post", last)])
        rows = torch.arange(len(ids), device=dev)
        x_BD, final_BD = cache[names[0]][rows, pos_B], cache[names[1]][rows, pos_B]
        u_BD = W_U_VD[task.correct_N[s : s + batch_size].to(dev)] - W_U_VD[
            task.wrong_N[s : s + batch_size].to(dev)
        ]
        f_BF = sae.encode(x_BD.to(sae_dev, sae.W_enc.dtype))
        frame = norm_frame(norm, final_BD)
        out.append(direct_attribution(sae, frame, f_BF, final_BD, u_BD).float().cpu())
    return torch.cat(out)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (flattened); NaN if either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


@dataclass(frozen=True)
class CircuitResult:
    """Every figure of one SAE on one task."""

    task: str
    n_examples: int
    m_model: float
    """Mean m of the model (= the SAE spliced with its error term)."""
    m_empty: float
    """Mean m with every feature mean-ablated."""
    faithfulness: dict[int, float]
    """Per circuit size N: (m(C) - m(∅)) / (m(M) - m(∅)); NaN when undefined (`normalised`)."""
    completeness: dict[int, float]
    """Per circuit size N: (m(M \\ C) - m(∅)) / (m(M) - m(∅))."""
    dla_total: float
    """Mean over examples of Σ_i attr_i: the features' summed direct effect on m."""
    dla_mean_active: float
    """Mean over examples of the mean attr_i over the features active at the answer position:
    the paper's "feature averaged DLA" (Appendix B, Figure 8)."""
    atp_exact_corr: float
    """Pearson r of IE_AtP against exact patching, over examples x the checked features (NaN
    when none were checked)."""
    ie_NF: Tensor = field(repr=False)
    """IE_AtP per example and feature."""
    dla_NF: Tensor = field(repr=False)
    """Direct logit attribution per example and feature."""

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics, `circuit/<task>/...` and `dla/<task>/...`."""
        p = f"circuit/{self.task}"
        out = {f"{p}/m_model": self.m_model, f"{p}/m_empty": self.m_empty}
        out |= {f"{p}/faithfulness/n{n}": v for n, v in self.faithfulness.items()}
        out |= {f"{p}/completeness/n{n}": v for n, v in self.completeness.items()}
        if not math.isnan(self.atp_exact_corr):
            out[f"{p}/atp_exact_corr"] = self.atp_exact_corr
        out[f"dla/{self.task}/total"] = self.dla_total
        out[f"dla/{self.task}/mean_active"] = self.dla_mean_active
        return out


def evaluate_circuits(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    task: TaskSet,
    sizes: Sequence[int],
    special_ids: Sequence[int] = (),
    exact_check: int = 0,
    batch_size: int = 16,
    min_effect: float = 0.0,
    completeness_sizes: Sequence[int] | None = None,
) -> CircuitResult:
    """Attribution patching, faithfulness per circuit size of `sizes` and completeness per size
    of `completeness_sizes` (default: `sizes`; the paper has a list for each), NaN where the
    features' whole effect is below `min_effect` (see `normalised`), direct logit attribution
    and (for the `exact_check` features of largest mean |IE|) the correlation of attribution
    patching with exact activation patching, for one SAE on one task."""
    pat = attribution_patching(model, sae, site, layer, task, special_ids, batch_size)
    m = ablation_means(model, sae, site, layer, task, pat, sizes, special_ids, batch_size,
                       complement_sizes=completeness_sizes)
    m_model, m_empty = m.model, m.empty
    corr = float("nan")
    if exact_check > 0:
        top = pat.ie_NF.abs().mean(0).argsort(descending=True)[:exact_check].tolist()
        exact_NK = exact_effects(model, sae, site, layer, task, top, special_ids, batch_size)
        corr = pearson(pat.ie_NF[:, top], exact_NK)
    dla_NF = task_dla(model, sae, site, layer, task, batch_size)
    active_NF = dla_NF != 0
    per_example = dla_NF.sum(1) / active_NF.sum(1).clamp_min(1)
    return CircuitResult(
        task=task.name,
        n_examples=len(task),
        m_model=m_model,
        m_empty=m_empty,
        faithfulness={n: normalised(v, m_model, m_empty, min_effect)
                      for n, v in m.circuit.items()},
        completeness={n: normalised(v, m_model, m_empty, min_effect)
                      for n, v in m.complement.items()},
        dla_total=float(dla_NF.sum(1).mean()),
        dla_mean_active=float(per_example.mean()),
        atp_exact_corr=corr,
        ie_NF=pat.ie_NF,
        dla_NF=dla_NF,
    )


def circuit_feature_table(results: Sequence[CircuitResult], n: int) -> dict[str, list]:
    """Per task and feature: mean IE_AtP, mean |IE|, mean DLA, and the share of examples whose
    circuit of size `n` holds the feature; columns of a table (features never in a circuit
    and with no effect are left out)."""
    cols: dict[str, list] = {k: [] for k in ("task", "feature", "mean_ie", "mean_abs_ie",
                                              "mean_dla", "in_circuit")}
    for r in results:
        top_Nn = r.ie_NF.abs().topk(min(n, r.ie_NF.shape[1]), dim=1).indices
        in_c_F = torch.zeros_like(r.ie_NF).scatter(1, top_Nn, 1.0).mean(0)
        abs_F = r.ie_NF.abs().mean(0)
        for i in torch.nonzero((in_c_F > 0) | (abs_F > 0)).flatten().tolist():
            cols["task"].append(r.task)
            cols["feature"].append(i)
            cols["mean_ie"].append(float(r.ie_NF[:, i].mean()))
            cols["mean_abs_ie"].append(float(abs_F[i]))
            cols["mean_dla"].append(float(r.dla_NF[:, i].mean()))
            cols["in_circuit"].append(float(in_c_F[i]))
    return cols


def mean_over_tasks(results: Sequence[CircuitResult]) -> dict[str, float]:
    """`circuit/mean/...` and `dla/mean/...`: each metric averaged over the tasks that have it
    (NaNs left out)."""
    acc: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.metrics().items():
            kind, _task, rest = k.split("/", 2)
            if not math.isnan(v):
                acc.setdefault(f"{kind}/mean/{rest}", []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}
