"""Folders written by raysae load in SAELens (the real package) with identical outputs, and back."""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from safetensors.torch import load_file

from raysae.config import SAEConfig
from raysae.models import hook_name
from raysae.sae import SAE, SAEMetadata

ARCHS = ["relu", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"]


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_raysae_folder_and_back(arch, tmp_path):
    cfg = SAEConfig(architecture=arch, d_sae=96, k=8, jumprelu_threshold=0.3,
                    matryoshka_widths=(16, 48, 96))
    meta = SAEMetadata("pythia-70m", hook_name("resid_post", 3), 128, True)
    sae = SAE(cfg, 24, metadata=meta)
    with torch.no_grad():  # non-trivial biases and decoder norms, so every term is exercised
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    if sae.cfg.uses_k and arch != "topk":
        sae.update_threshold_(torch.tensor(0.3))
    sae.save(tmp_path / "raysae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "raysae"), device="cpu")
    expected = {"relu": "StandardSAE", "topk": "TopKSAE"}.get(arch, "JumpReLUSAE")
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


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_folder_matches_saelens_own_and_loads_both_ways(arch, tmp_path):
    """SAELens saves a trained BatchTopK SAE as JumpReLU with its threshold on every latent:
    raysae writes the same architecture, tensors and training metadata, and reads SAELens's
    folder back as the BatchTopK SAE it was trained as."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    widths = [16, 48, 96]
    if arch == "batchtopk":
        trained = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=24, d_sae=96, k=8))
    else:
        trained = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=24, d_sae=96, k=8, matryoshka_widths=list(widths)))
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_(std=0.3)
        trained.topk_threshold.fill_(0.25)
    trained.save_inference_model(str(tmp_path / "saelens"))
    ours = SAE(SAEConfig(architecture=arch, d_sae=96, k=8, matryoshka_widths=tuple(widths)), 24)
    ours.update_threshold_(torch.tensor(0.25))
    ours.save(tmp_path / "raysae")

    def layout(folder):
        cfg = json.loads((tmp_path / folder / "cfg.json").read_text())
        tensors = load_file(str(tmp_path / folder / "sae_weights.safetensors"))
        details = cfg["metadata"]["training_architecture_details"]
        return (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"],
                cfg["normalize_activations"], cfg["metadata"]["training_architecture"],
                details["k"], details.get("matryoshka_widths"),
                {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})

    assert layout("raysae") == layout("saelens")
    back = SAE.load(tmp_path / "saelens")
    expected_widths = tuple(widths) if arch == "matryoshka_batchtopk" else (96,)
    assert (back.cfg.architecture, back.cfg.k, back.widths) == (arch, 8, expected_widths)
    assert float(back.topk_threshold) == 0.25
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    x = torch.randn(256, 24)
    with torch.no_grad():
        assert (back.encode(x) > 0).any()
        assert torch.allclose(back.encode(x), theirs.encode(x), atol=1e-5)
        assert torch.allclose(back(x).recon_BD, theirs(x), atol=1e-5)
