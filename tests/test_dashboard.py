"""Feature dashboards: the streamed stats against brute force over the whole [N, T, F] tensor,
the HTML (escaping, atomic replacement), the CLI, and the pages as a real headless browser
renders them."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import pytest
import torch
import yaml
from conftest import TINY_NEOX, build_cfg, headless
from transformers import AutoConfig, AutoModelForCausalLM

from raysae.cli import main
from raysae.config import SAEConfig, TrainConfig, to_dict
from raysae.features import dashboard
from raysae.models import get_blocks, hook_name, run_with_cache
from raysae.sae import SAE, SAEMetadata

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = (0, 1, 2)  # TINY_NEOX's BOS, EOS, PAD
SITE, LAYER = "resid_post", 1
N, T, BATCH = 11, 16, 4  # an uneven last batch exercises the running top-k merge


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(TINY_NEOX)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)).eval()


@pytest.fixture(scope="module")
def tokens_NT() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY_NEOX["vocab_size"], (N, T), generator=gen)
    ids[:, 0] = 0  # BOS
    ids[3, 7] = ids[5, 2] = 1  # EOS mid-sequence
    ids[8, -3:] = 2  # trailing PAD
    return ids


def build_sae(arch: str, d_sae: int = 96) -> SAE:
    sae = SAE(SAEConfig(architecture=arch, d_sae=d_sae, k=3), TINY_NEOX["hidden_size"], seed=3)
    with torch.no_grad():  # a negative bias makes the relu SAE sparse, so some features are rare
        sae.b_enc.fill_(-0.07 if arch == "relu" else 0.0)
    return sae


def brute_force(model, sae, tokens_NT) -> torch.Tensor:
    """The latents [N, T, F] of every token, zero at special positions. Same batches as the
    streamed pass, so the values are bit-identical."""
    parts = []
    for s in range(0, N, BATCH):
        x = run_with_cache(model, tokens_NT[s : s + BATCH], [(SITE, LAYER)])[hook_name(SITE, LAYER)]
        parts.append(sae.encode(x).detach().float())
    keep_NT = ~torch.isin(tokens_NT, torch.tensor(SPECIAL))
    return torch.cat(parts) * keep_NT[..., None]


def collect(model, sae, tokens_NT, **kw):
    args = dict(special_ids=SPECIAL, n_features=20, n_contexts=6, n_bins=7, n_logits=5,
                batch_size=BATCH) | kw
    return dashboard.collect_feature_stats(model, sae, SITE, LAYER, tokens_NT, **args)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_stats_match_brute_force(model, tokens_NT, arch):
    sae = build_sae(arch)
    stats, fire_F = collect(model, sae, tokens_NT)
    f_NTF = brute_force(model, sae, tokens_NT)
    keep_NT = ~torch.isin(tokens_NT, torch.tensor(SPECIAL))
    n_keep = int(keep_NT.sum())
    assert torch.equal(fire_F, (f_NTF > 0).sum((0, 1)))
    assert len(stats) == 20 and [s.index for s in stats] == dashboard.choose_features(fire_F, 20)
    W_U_VD = model.get_output_embeddings().weight.detach()
    logits_FV = sae.W_dec.detach() @ W_U_VD.T
    few = 0
    for st in stats:
        f_NT = f_NTF[..., st.index]
        assert st.frequency == pytest.approx(float((f_NT > 0).sum()) / n_keep)
        assert st.max_activation == pytest.approx(float(f_NT.max()))
        # contexts: exactly the global top-n positive activations, highest first
        vals, flat = f_NT.flatten().topk(6)
        want = [(int(i) // T, int(i) % T, float(v)) for v, i in zip(vals, flat, strict=True) if v > 0]
        got = [(c.seq, c.pos, c.activation) for c in st.contexts]
        assert got == want
        few += len(got) < 6
        for c in st.contexts:
            assert bool(keep_NT[c.seq, c.pos])
            lo = max(0, c.pos - 8)
            assert c.token_ids == tokens_NT[c.seq, lo : c.pos + 4].tolist()
            assert c.token_acts == f_NT[c.seq, lo : c.pos + 4].tolist()
            assert c.max_index == c.pos - lo
            assert c.token_acts[c.max_index] == c.activation  # (a neighbour may be higher)
        # histogram of the non-zero activations, n_bins equal bins from 0 to the max
        assert sum(st.hist_counts) == int((f_NT > 0).sum())
        assert len(st.hist_edges) == 8 and st.hist_edges[0] == 0
        assert st.hist_edges[-1] == pytest.approx(st.max_activation)
        assert st.hist_counts == torch.histc(f_NT[f_NT > 0], 7, 0, st.max_activation).long().tolist()
        # direct logit effects
        order = logits_FV[st.index].argsort(descending=True)
        assert [t for t, _ in st.top_logits] == order[:5].tolist()
        assert [t for t, _ in st.bottom_logits] == order.flip(0)[:5].tolist()
        assert [v for _, v in st.top_logits] == pytest.approx(logits_FV[st.index, order[:5]].tolist(), rel=1e-5)
    if arch == "topk":
        assert few > 0  # some features fire fewer than n_contexts times: that path is covered


def test_the_lm_runs_once_per_batch(model, tokens_NT):
    """Both passes read the site activations of one LM pass (blocks above the site never run)."""
    calls = []
    handle = get_blocks(model)[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        collect(model, build_sae("relu"), tokens_NT)
    finally:
        handle.remove()
    assert len(calls) == -(-N // BATCH)


def test_window_clipped_at_sequence_start(model, tokens_NT):
    sae = build_sae("relu")
    stats, _ = collect(model, sae, tokens_NT, window_before=20, window_after=20)
    for c in (c for st in stats for c in st.contexts):
        assert c.token_ids == tokens_NT[c.seq].tolist() and c.max_index == c.pos


def test_choose_features():
    counts_F = torch.tensor([0, 5, 0, 1, 9, 0, 2, 7, 3, 0, 4, 1])
    alive = {1, 3, 4, 6, 7, 8, 10, 11}
    a = dashboard.choose_features(counts_F, 4, seed=0)
    assert len(a) == 4 and set(a) <= alive and a == sorted(a)
    assert dashboard.choose_features(counts_F, 4, seed=0) == a
    assert len({tuple(dashboard.choose_features(counts_F, 4, seed=s)) for s in range(6)}) > 1
    assert dashboard.choose_features(counts_F, 100) == sorted(alive)


def test_token_decoder():
    class Tok:
        def convert_ids_to_tokens(self, i):
            return {5: "Ġthe", 6: "Ċ", 7: "▁cat"}.get(i)

    d = dashboard.token_decoder(Tok())
    assert [d(5), d(6), d(7), d(99)] == ["␣the", "↵", "␣cat", "#99"]
    assert dashboard.token_decoder(None)(42) == "#42"


EVIL = 17  # a token whose text is markup


def decoder(raise_after: int | None = None):
    calls = 0

    def decode(i: int) -> str:
        nonlocal calls
        calls += 1
        if raise_after is not None and calls > raise_after:
            raise RuntimeError("decode failed halfway")  # (after a few pages are written)
        return "<script>alert(1)</script>" if i == EVIL else f"t{i}&"

    return decode


@pytest.fixture(scope="module")
def relu_stats(model, tokens_NT):
    stats, _ = collect(model, build_sae("relu"), tokens_NT, n_features=5)
    # make sure the markup token shows in a context and in the logits of the first feature
    st = stats[0]
    c = dataclasses.replace(st.contexts[0], token_ids=[EVIL, *st.contexts[0].token_ids[1:]])
    return [dataclasses.replace(st, contexts=[c, *st.contexts[1:]],
                                top_logits=[(EVIL, 1.0), *st.top_logits[1:]]), *stats[1:]]


def test_write_dashboard_escapes_and_links(tmp_path, relu_stats):
    out = dashboard.write_dashboard(relu_stats, tmp_path / "dash", decoder(), "a <b> title",
                                    {"hook": "blocks.1.hook_resid_post"})
    index = (out / "index.html").read_text()
    pages = {s.index: (out / "features" / f"{s.index}.html").read_text() for s in relu_stats}
    for text in [index, *pages.values()]:
        assert "<script" not in text and "<b>" not in text and "http" not in text  # no URLs
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[relu_stats[0].index]
    assert "a &lt;b&gt; title" in index and "blocks.1.hook_resid_post" in index
    for s in relu_stats:
        assert f'href="features/{s.index}.html"' in index
        assert 'href="../index.html"' in pages[s.index] and "<svg" in pages[s.index]
        assert pages[s.index].count("<mark") == len(s.contexts)


def test_write_dashboard_replaces_atomically(tmp_path, relu_stats):
    out = tmp_path / "dash"
    dashboard.write_dashboard(relu_stats, out, decoder(), "first")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="halfway"):
        dashboard.write_dashboard(relu_stats[::-1], out, decoder(raise_after=200), "second")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dash"]  # no temporary left behind
    dashboard.write_dashboard(relu_stats[:2], out, decoder(), "third")
    assert "third" in (out / "index.html").read_text()
    assert len(list((out / "features").iterdir())) == 2


def test_write_comparison(tmp_path, model, tokens_NT, relu_stats):
    first = [s.index for s in relu_stats]
    other, _ = collect(model, build_sae("topk"), tokens_NT, features=first[1:])
    out = dashboard.write_comparison(
        [("SAE_1 (scratch)", relu_stats), ("SAE_2←1 fwd", other)], tmp_path / "cmp", decoder(), "cmp")
    index = (out / "index.html").read_text()
    assert all(f'href="compare/{i}.html"' in index for i in first)
    page0 = (out / "compare" / f"{first[0]}.html").read_text()
    assert "SAE_2←1 fwd" in page0 and "not sampled" in page0
    page1 = (out / "compare" / f"{first[1]}.html").read_text()
    assert "not sampled" not in page1 and page1.count('class="col"') == 2


def test_cli_dashboard(tmp_path, token_file, model):
    cfg = build_cfg(tmp_path, token_file, train=TrainConfig(num_tokens=512, batch_size=64, eval_tokens=160))
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(cfg)))
    sae = build_sae("relu")
    sae.metadata = SAEMetadata(model_name="tiny-neox", hook_name=hook_name(SITE, 2))
    sae_dir = sae.save(tmp_path / "sae")
    assert main(["dashboard", str(cfg_path), "--sae", str(sae_dir)]) == 0
    index = (sae_dir / "dashboard" / "index.html").read_text()
    assert "blocks.2.hook_resid_post" in index and index.count('href="features/') == 32
    assert main(["dashboard", str(cfg_path), "--sae", str(sae_dir), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "index.html").is_file()


# ---------------------------------------------------------------------------------------------
# A real browser


def test_pages_render_in_a_browser(tmp_path, relu_stats):
    out = dashboard.write_dashboard(relu_stats, tmp_path / "dash", decoder(), "browser check")
    dom = headless((out / "index.html").as_uri(), "--dump-dom").stdout
    links = set(re.findall(r'href="features/(\d+)\.html"', dom))
    assert links == {str(s.index) for s in relu_stats}
    assert "<script" not in dom
    st = relu_stats[1]
    page = dom = headless((out / "features" / f"{st.index}.html").as_uri(), "--dump-dom").stdout
    marks = re.findall(r'<mark title="([^"]+)"><span[^>]*>([^<]*)</span></mark>', page)
    assert len(marks) == len(st.contexts)
    for c, (title, text) in zip(st.contexts, marks, strict=True):
        assert float(title) == pytest.approx(c.activation, rel=1e-3)
        assert text == f"t{c.token_ids[c.max_index]}&amp;"
        assert f">{c.activation:.4g}<" in page
    png = tmp_path / "feature.png"
    headless((out / "features" / f"{st.index}.html").as_uri(), f"--screenshot={png}",
             "--window-size=1200,1000", "--hide-scrollbars")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    shot = os.environ.get("RAYSAE_DASHBOARD_SHOT")  # keep one to look at
    if shot:
        shutil.copy(png, shot)
