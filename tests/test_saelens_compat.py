"""Folders written by raysae load in SAELens (the real package) with identical outputs, and back."""

from __future__ import annotations

import pytest
import sae_lens
import torch

from raysae.config import SAEConfig
from raysae.models import hook_name
from raysae.sae import SAE, SAEMetadata


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_saelens_loads_raysae_folder_and_back(arch, tmp_path):
    cfg = SAEConfig(architecture=arch, d_sae=96, k=8, jumprelu_threshold=0.3)
    meta = SAEMetadata("pythia-70m", hook_name("resid_post", 3), 128, True)
    sae = SAE(cfg, 24, metadata=meta)
    with torch.no_grad():  # non-trivial biases and decoder norms, so every term is exercised
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    sae.save(tmp_path / "raysae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "raysae"), device="cpu")
    expected = {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}[arch]
    assert type(theirs).__name__ == expected

    x = torch.randn(512, 24) * 2
    with torch.no_grad():
        ours_f, ours_r = sae.encode(x), sae(x).recon_BD
        their_f = theirs.encode(x)
        their_r = theirs(x)
    assert (ours_f > 0).any(dim=1).all()  # latents are active, the comparison means something
    assert torch.allclose(ours_f, their_f, atol=1e-5)
    assert torch.allclose(ours_r, their_r, atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "pythia-70m"

    theirs.save_model(str(tmp_path / "saelens"))
    back = SAE.load(tmp_path / "saelens")
    with torch.no_grad():
        assert torch.allclose(back(x).recon_BD, their_r, atol=1e-5)
