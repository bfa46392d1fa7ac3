"""Hooks, truncation and splicing on tiny models built from a config."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_NEOX

from raysae.config import ConfigError, ModelConfig
from raysae.models import (
    get_blocks,
    hook_name,
    load_lm,
    model_dims,
    parse_hook_name,
    run_with_cache,
    splice,
    validate_sites,
)

GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
            bos_token_id=0, eos_token_id=1)
LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, vocab_size=128, bos_token_id=0,
             eos_token_id=1)
GEMMA2 = dict(model_type="gemma2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=128,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)


@pytest.fixture(scope="module")
def neox():
    return load_lm(ModelConfig(name="tiny", from_config=TINY_NEOX))


def manual_neox_outputs(model, ids_BT):
    """Block outputs computed by calling each block by hand, plus the logits."""
    g = model.gpt_neox
    h = g.embed_in(ids_BT)
    pos = torch.arange(ids_BT.shape[1])[None]
    pe = g.rotary_emb(h, position_ids=pos)
    outs = []
    for layer in g.layers:
        h = layer(h, position_ids=pos, position_embeddings=pe, attention_mask=None)
        outs.append(h[0] if isinstance(h, tuple) else h)
        h = outs[-1]
    return outs, model.get_output_embeddings()(g.final_layer_norm(h))


def test_hooks_return_block_outputs(neox):
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        outs, logits = manual_neox_outputs(neox, ids)
        assert torch.allclose(logits, neox(ids).logits, atol=1e-5)  # the manual forward is right
    cache = run_with_cache(neox, ids, [("resid_post", i) for i in range(3)] + [("resid_pre", 0)])
    for i in range(3):
        assert torch.allclose(cache[hook_name("resid_post", i)], outs[i], atol=1e-6)
    assert torch.equal(cache["blocks.0.hook_resid_pre"], neox.gpt_neox.embed_in(ids))


def test_truncation_stops_early_and_matches_full_forward(neox):
    ids = torch.randint(3, 128, (2, 16))
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, b in enumerate(get_blocks(neox))]
    try:
        cache = run_with_cache(neox, ids, [("resid_post", 0), ("resid_pre", 1)])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]  # block 1 never ran: its input was all we asked for
    with torch.no_grad():
        hs = neox(ids, output_hidden_states=True).hidden_states
    assert torch.equal(cache["blocks.0.hook_resid_post"], hs[1])
    assert torch.equal(cache["blocks.1.hook_resid_pre"], hs[1])


@pytest.mark.parametrize("spec", [GPT2, LLAMA, GEMMA2], ids=["gpt2", "llama", "gemma2"])
def test_other_families(spec):
    model = load_lm(ModelConfig(name="m", from_config=spec))
    ids = torch.randint(3, 128, (2, 8))
    cache = run_with_cache(model, ids, [("resid_post", 0), ("resid_pre", 1), ("resid_post", 1)])
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    assert cache["blocks.1.hook_resid_post"].shape == (2, 8, 64)
    assert not torch.allclose(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_pre"])


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_splice_identity_and_zeros(neox, site):
    ids = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        clean = neox(ids).logits
        with splice(neox, site, 1, lambda x: x):
            same = neox(ids).logits
        with splice(neox, site, 1, torch.zeros_like):
            zero = neox(ids).logits
        after = neox(ids).logits
    assert torch.equal(same, clean)
    assert (zero - clean).abs().max() > 1e-3
    assert torch.equal(after, clean)  # the hook is gone after the context


def test_splice_feeds_later_hooks(neox):
    ids = torch.randint(3, 128, (1, 8))
    with splice(neox, "resid_post", 0, lambda x: 2 * x):
        cache = run_with_cache(neox, ids, [("resid_post", 0), ("resid_pre", 1)])
    assert torch.allclose(cache["blocks.1.hook_resid_pre"], 2 * run_with_cache(
        neox, ids, [("resid_post", 0)])["blocks.0.hook_resid_post"])


def test_hook_names_and_validation():
    assert parse_hook_name("blocks.11.hook_resid_post") == ("resid_post", 11)
    with pytest.raises(ConfigError, match="hook_mlp_out"):
        parse_hook_name("blocks.1.hook_mlp_out")
    cfg = ModelConfig(name="tiny", from_config=TINY_NEOX)
    assert model_dims(cfg) == (3, 64)
    assert validate_sites(cfg, ["resid_post"], [0, 2]) == 64
    with pytest.raises(ConfigError, match=r"layer 3 .* 3 blocks \(allowed: 0\.\.2\)"):
        validate_sites(cfg, ["resid_post"], [0, 3])
