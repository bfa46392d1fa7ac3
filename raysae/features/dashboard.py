"""Static HTML feature dashboards for any SAE: what each latent fires on, and what it writes.

`collect_feature_stats` streams held-out token windows through the LM and the SAE and keeps,
per chosen feature, only a running top-k of contexts and a histogram; `write_dashboard` turns
the result into plain HTML files (an index and one page per feature) that open from disk with
no server, scripts or external URLs. `write_comparison` puts the same feature index of several
SAEs side by side: the Figure-23 view of the layer-transfer paper (Ghilardi et al. 2024), e.g.
SAE_2 trained from scratch next to SAE_3←2 and SAE_1←2. Pure torch and stdlib.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysae.checkpoint import write_folder_atomically
from raysae.models import hook_name, run_with_cache
from raysae.sae import SAE


@dataclass(frozen=True)
class Context:
    """One top activation of a feature and the tokens around it."""

    seq: int
    """Row of the scanned token windows."""
    pos: int
    """Position in that row."""
    activation: float
    """The feature's activation on the token at (seq, pos)."""
    token_ids: list[int]
    """Token ids of the window around pos, clipped to the row."""
    token_acts: list[float]
    """The feature's activation on each window token (0 on special tokens)."""
    max_index: int
    """Index of (seq, pos) within the window."""


@dataclass(frozen=True)
class FeatureStats:
    """Everything one feature's page shows."""

    index: int
    """The latent's index in the SAE."""
    frequency: float
    """Share of the scanned (non-special) tokens on which f > 0."""
    max_activation: float
    """Largest activation over the scanned tokens."""
    contexts: list[Context]
    """The top activations, highest first."""
    hist_edges: list[float]
    """n_bins + 1 equal-width bin edges from 0 to max_activation."""
    hist_counts: list[int]
    """Number of non-zero activations in each bin."""
    top_logits: list[tuple[int, float]]
    """(token id, value) of the largest entries of W_dec[i] @ W_U^T (direct logit effect)."""
    bottom_logits: list[tuple[int, float]]
    """(token id, value) of its smallest entries."""


def choose_features(fire_counts_F: Tensor, n: int, seed: int = 0) -> list[int]:
    """A seeded random sample of n features among those that fired (all if fewer), sorted."""
    alive = torch.nonzero(fire_counts_F.cpu() > 0).flatten()
    if len(alive) > n:
        gen = torch.Generator().manual_seed(seed)
        alive = alive[torch.randperm(len(alive), generator=gen)[:n]]
    return sorted(int(i) for i in alive)


def _site_batches(
    model: nn.Module, site: str, layer: int, tokens_NT: Tensor, special_ids: Sequence[int],
    batch_size: int,
) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """(first row, ids [B, T], keep [B, T], x [B, T, D]) per batch: the LM runs once, up to the
    site, and both passes of `collect_feature_stats` read these (N·T·D floats held)."""
    device = next(model.parameters()).device
    special = torch.tensor(list(special_ids), dtype=torch.long, device=device)
    out = []
    for s in range(0, len(tokens_NT), batch_size):
        ids_BT = tokens_NT[s : s + batch_size].to(device).long()
        x_BTD = run_with_cache(model, ids_BT, [(site, layer)])[hook_name(site, layer)]
        out.append((s, ids_BT, ~torch.isin(ids_BT, special), x_BTD))
    return out


def _feature_batches(
    sae: SAE, batches: list[tuple[int, Tensor, Tensor, Tensor]],
) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """(first row, ids [B, T], keep [B, T], latents [B, T, F]) with special positions zeroed."""
    for s, ids_BT, keep_BT, x_BTD in batches:
        with torch.no_grad():
            f_BTF = sae.encode(x_BTD.to(sae.W_enc.device, sae.W_enc.dtype)).float()
        yield s, ids_BT, keep_BT, f_BTF * keep_BT.to(f_BTF.device)[..., None]


class _Top(NamedTuple):
    """A running top-k per chosen feature [S, K]: values, where they are, the windows around."""

    vals_SK: Tensor
    seq_SK: Tensor
    pos_SK: Tensor
    ids_SKW: Tensor
    """Window token ids, -1 where the window runs past the row."""
    acts_SKW: Tensor


def _batch_top(f_BTS: Tensor, ids_BT: Tensor, start: int, k: int, before: int, after: int) -> _Top:
    """The batch's own top-k per feature, windows cut from the zero / -1 padded batch."""
    B, T, S = f_BTS.shape
    vals_SK, idx_SK = f_BTS.reshape(B * T, S).t().topk(min(k, B * T), dim=1)
    b_SK1, t_SK = (idx_SK // T)[..., None], idx_SK % T
    tt_SKW = t_SK[..., None] + torch.arange(before + 1 + after)
    ids_pad = F.pad(ids_BT, (before, after), value=-1)
    f_pad = F.pad(f_BTS, (0, 0, before, after))
    acts_SKW = f_pad[b_SK1, tt_SKW, torch.arange(S)[:, None, None]]
    return _Top(vals_SK, start + b_SK1[..., 0], t_SK, ids_pad[b_SK1, tt_SKW], acts_SKW)


def _merge(a: _Top, b: _Top, k: int) -> _Top:
    cat = [torch.cat([x, y], 1) for x, y in zip(a, b, strict=True)]
    vals_SK, keep_SK = cat[0].topk(min(k, cat[0].shape[1]), dim=1)
    idx = [keep_SK if x.dim() == 2 else keep_SK[..., None].expand(-1, -1, x.shape[2])
           for x in cat[1:]]
    return _Top(vals_SK, *(x.gather(1, i) for x, i in zip(cat[1:], idx, strict=True)))


def _contexts(top: _Top, s: int, before: int) -> list[Context]:
    out = []
    for j in range(top.vals_SK.shape[1]):
        if top.vals_SK[s, j] <= 0:  # fewer firings than contexts asked for
            break
        real_W = top.ids_SKW[s, j] >= 0
        first = int(real_W.nonzero()[0])
        out.append(Context(
            int(top.seq_SK[s, j]), int(top.pos_SK[s, j]), float(top.vals_SK[s, j]),
            top.ids_SKW[s, j][real_W].tolist(), top.acts_SKW[s, j][real_W].tolist(), before - first,
        ))
    return out


def collect_feature_stats(
    model: nn.Module, sae: SAE, site: str, layer: int, tokens_NT: Tensor,
    special_ids: Sequence[int] = (), features: Sequence[int] | None = None,
    n_features: int = 32, n_contexts: int = 10, window_before: int = 8, window_after: int = 3,
    n_bins: int = 30, n_logits: int = 10, batch_size: int = 16, seed: int = 0,
) -> tuple[list[FeatureStats], Tensor]:
    """The stats of the chosen features (`features`, else `choose_features` on the fire counts)
    and the fire counts [F] of all features, over the non-special tokens of `tokens_NT`.

    The LM runs once over the tokens (its site activations are held for both passes); pass 1
    counts firings and maxima of all features (the histogram edges need the max), pass 2 keeps
    only a running top-k of (activation, window) and a histogram per chosen feature.
    """
    batches = _site_batches(model, site, layer, tokens_NT, special_ids, batch_size)
    fire_F = torch.zeros(sae.d_sae, dtype=torch.long)
    max_F = torch.zeros(sae.d_sae)
    n_scanned = 0
    for _, _, keep_BT, f_BTF in _feature_batches(sae, batches):
        fire_F += (f_BTF > 0).sum((0, 1)).cpu()
        max_F = torch.maximum(max_F, f_BTF.amax((0, 1)).cpu())
        n_scanned += int(keep_BT.sum())
    chosen = list(features) if features is not None else choose_features(fire_F, n_features, seed)

    S, W = len(chosen), window_before + 1 + window_after
    sel_S = torch.tensor(chosen, dtype=torch.long)
    top = _Top(torch.empty(S, 0), *[torch.empty(S, 0, dtype=torch.long)] * 2,
               torch.empty(S, 0, W, dtype=torch.long), torch.empty(S, 0, W))
    counts_SH = torch.zeros(S, n_bins, dtype=torch.long)
    scale_S = n_bins / max_F[sel_S].clamp_min(1e-30)
    for start, ids_BT, _, f_BTF in _feature_batches(sae, batches):
        f_BTS = f_BTF[..., sel_S.to(f_BTF.device)].cpu()
        # bin = floor(f / max · n_bins), the max itself in the last bin
        bin_BTS = (f_BTS * scale_S).long().clamp(0, n_bins - 1) + torch.arange(S) * n_bins
        counts_SH += torch.bincount(bin_BTS[f_BTS > 0], minlength=S * n_bins).view(S, n_bins)
        batch = _batch_top(f_BTS, ids_BT.cpu(), start, n_contexts, window_before, window_after)
        top = _merge(top, batch, n_contexts)

    W_U_VD = model.get_output_embeddings().weight.detach().float()
    logits_SV = sae.W_dec.detach()[sel_S.to(sae.W_dec.device)].float().to(W_U_VD.device) @ W_U_VD.T
    k = min(n_logits, logits_SV.shape[1])
    hi, lo = logits_SV.topk(k, dim=1), logits_SV.topk(k, dim=1, largest=False)
    stats = [
        FeatureStats(
            index=i,
            frequency=float(fire_F[i]) / max(n_scanned, 1),
            max_activation=float(max_F[i]),
            contexts=_contexts(top, s, window_before),
            hist_edges=torch.linspace(0, float(max_F[i]), n_bins + 1).tolist(),
            hist_counts=counts_SH[s].tolist(),
            top_logits=list(zip(hi.indices[s].tolist(), hi.values[s].tolist(), strict=True)),
            bottom_logits=list(zip(lo.indices[s].tolist(), lo.values[s].tolist(), strict=True)),
        )
        for s, i in enumerate(chosen)
    ]
    return stats, fire_F


def token_decoder(tokenizer: Any | None) -> Callable[[int], str]:
    """Token id -> display text: the tokenizer's token with whitespace markers made visible
    (GPT-2's Ġ/Ċ, SentencePiece's ▁), or `#id` without a tokenizer."""
    marks = str.maketrans({"Ġ": "␣", "▁": "␣", " ": "␣", "Ċ": "↵", "\n": "↵", "ĉ": "⇥", "\t": "⇥"})

    def decode(i: int) -> str:
        tok = tokenizer.convert_ids_to_tokens(int(i)) if tokenizer is not None else None
        return f"#{i}" if tok is None else str(tok).translate(marks)

    return decode


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:24px}a{color:#1558b0}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{font-family:ui-monospace,monospace;white-space:pre;padding:1px 2px;margin-right:1px;border:1px solid #e6e6e6;border-radius:3px}
.logit{font-family:ui-monospace,monospace;background:#eef;border-radius:3px;padding:0 4px;margin:1px;display:inline-block}
.neg{background:#fde8e8}.ctx{display:flex;align-items:baseline;margin:3px 0;line-height:1.9}
.act{flex:none;width:72px;color:#666}.toks{flex:1;min-width:0}
mark{outline:2px solid #c20;background:inherit}.cols{display:flex;gap:16px;align-items:flex-start}
.col{flex:1;min-width:0;border:1px solid #ddd;border-radius:6px;padding:0 12px 8px}.col h2{margin-top:10px}
.missing{color:#999;font-style:italic}
"""


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _page(title: str, body: str, back: str | None = None) -> str:
    nav = f'<p><a href="{back}">← back to index</a></p>' if back else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_CSS}</style></head><body>{nav}{body}</body></html>\n")


def _meta_table(meta: dict[str, str] | None) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in (meta or {}).items())
    return f'<table class="meta">{rows}</table>' if rows else ""


def _logits(pairs: list[tuple[int, float]], decode: Callable[[int], str], neg: bool = False) -> str:
    cls = "logit neg" if neg else "logit"
    return " ".join(f'<span class="{cls}" title="{v:+.3f}">{html.escape(decode(t))} '
                    f"<small>{v:+.3g}</small></span>" for t, v in pairs)


def _context(c: Context, scale: float, decode: Callable[[int], str]) -> str:
    toks = []
    for j, (t, a) in enumerate(zip(c.token_ids, c.token_acts, strict=True)):
        alpha = min(max(a / scale, 0.0), 1.0) if scale > 0 else 0.0
        span = (f'<span class="tok" style="background:rgba(255,140,0,{alpha:.2f})" '
                f'title="{a:.4g}">{html.escape(decode(t))}</span>')
        toks.append(f'<mark title="{a:.4g}">{span}</mark>' if j == c.max_index else span)
    return (f'<div class="ctx" title="row {c.seq}, position {c.pos}"><span class="act">'
            f'{c.activation:.4g}</span><span class="toks">{"<wbr>".join(toks)}</span></div>')


def _contexts_html(st: FeatureStats, decode: Callable[[int], str]) -> str:
    ctx = "".join(_context(c, st.max_activation, decode) for c in st.contexts)
    return ctx or '<p class="missing">never fired</p>'


def _histogram(st: FeatureStats, width: int = 480, height: int = 140) -> str:
    top = max(st.hist_counts, default=0) or 1
    bw, ph = (width - 50) / max(len(st.hist_counts), 1), height - 30
    bars = "".join(
        f'<rect x="{40 + k * bw:.1f}" y="{10 + ph * (1 - c / top):.1f}" width="{max(bw - 1, 0.5):.1f}"'
        f' height="{ph * c / top:.1f}" fill="#e08a00"><title>{lo:.3g}–{hi:.3g}: {c}</title></rect>'
        for k, (c, lo, hi) in enumerate(zip(st.hist_counts, st.hist_edges, st.hist_edges[1:])))
    text = '<text font-size="11" x="{}" y="{}" text-anchor="{}" fill="{}">{}</text>'.format
    axis = (f'<line x1="40" y1="{10 + ph}" x2="{width - 10}" y2="{10 + ph}" stroke="#444"/>'
            + text(40, height - 4, "start", "#222", 0)
            + text(width - 10, height - 4, "end", "#222", f"{st.max_activation:.3g}")
            + text((width + 30) / 2, height - 4, "middle", "#666", "activation")
            + text(34, 18, "end", "#222", top))
    return f'<svg width="{width}" height="{height}" role="img" aria-label="histogram">{bars}{axis}</svg>'


def _feature_body(st: FeatureStats, decode: Callable[[int], str]) -> str:
    return (f"<h1>Feature {st.index}</h1><table>"
            f"<tr><th>frequency</th><td class=num>{_pct(st.frequency)}</td></tr>"
            f"<tr><th>max activation</th><td class=num>{st.max_activation:.4g}</td></tr></table>"
            f"<h2>Non-zero activations</h2>{_histogram(st)}"
            f"<h2>Top logit effects</h2><p>{_logits(st.top_logits, decode)}</p>"
            f"<h2>Bottom logit effects</h2><p>{_logits(st.bottom_logits, decode, neg=True)}</p>"
            f"<h2>Top activations</h2>{_contexts_html(st, decode)}")


def write_dashboard(
    stats: list[FeatureStats], out_dir: str | Path, decode: Callable[[int], str], title: str,
    meta: dict[str, str] | None = None,
) -> Path:
    """index.html plus features/<index>.html, built in a sibling folder and renamed into place."""
    rows = "".join(
        f'<tr><td><a href="features/{s.index}.html">{s.index}</a></td>'
        f"<td class=num>{_pct(s.frequency)}</td><td class=num>{s.max_activation:.4g}</td>"
        f"<td>{_logits(s.top_logits[:5], decode)}</td></tr>" for s in stats)
    index = (f"<h1>{html.escape(title)}</h1>{_meta_table(meta)}<h2>{len(stats)} features</h2>"
             "<table><tr><th>feature</th><th>frequency</th><th>max act.</th>"
             f"<th>top logit tokens</th></tr>{rows}</table>")

    def write(tmp: Path) -> None:
        (tmp / "features").mkdir()
        for s in stats:
            page = _page(f"{title}: feature {s.index}", _feature_body(s, decode), "../index.html")
            (tmp / "features" / f"{s.index}.html").write_text(page, encoding="utf-8")
        (tmp / "index.html").write_text(_page(title, index), encoding="utf-8")

    return write_folder_atomically(out_dir, write)


def write_comparison(
    columns: list[tuple[str, list[FeatureStats]]], out_dir: str | Path,
    decode: Callable[[int], str], title: str, meta: dict[str, str] | None = None,
) -> Path:
    """The same feature index of several SAEs side by side: index.html lists the first column's
    indices, compare/<index>.html shows one column per SAE ("not sampled" where one lacks it)."""
    by_index = [{s.index: s for s in col} for _, col in columns]
    indices = [s.index for s in columns[0][1]] if columns else []
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    rows = "".join(
        f'<tr><td><a href="compare/{i}.html">{i}</a></td>'
        + "".join(f"<td class=num>{_pct(d[i].frequency) if i in d else '—'}</td>" for d in by_index)
        + "</tr>" for i in indices)
    index = (f"<h1>{html.escape(title)}</h1>{_meta_table(meta)}<h2>{len(indices)} features</h2>"
             f"<p>frequency of each feature in each SAE</p>"
             f"<table><tr><th>feature</th>{head}</tr>{rows}</table>")

    def column(name: str, st: FeatureStats | None) -> str:
        if st is None:
            return f'<div class="col"><h2>{html.escape(name)}</h2><p class="missing">not sampled</p></div>'
        return (f'<div class="col"><h2>{html.escape(name)}</h2><p>frequency {_pct(st.frequency)}'
                f" · max {st.max_activation:.4g}</p><p>{_logits(st.top_logits, decode)}</p>"
                f"{_contexts_html(st, decode)}</div>")

    def write(tmp: Path) -> None:
        (tmp / "compare").mkdir()
        for i in indices:
            cols = "".join(column(name, d.get(i)) for (name, _), d in zip(columns, by_index))
            body = f'<h1>Feature {i}</h1><div class="cols">{cols}</div>'
            page = _page(f"{title}: feature {i}", body, "../index.html")
            (tmp / "compare" / f"{i}.html").write_text(page, encoding="utf-8")
        (tmp / "index.html").write_text(_page(title, index), encoding="utf-8")

    return write_folder_atomically(out_dir, write)
