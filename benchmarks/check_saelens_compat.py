"""Check that raysae's SAE folders and SAELens's agree, in both directions.

Run with the python of a venv that has sae-lens installed (it imports raysae from this
checkout, which needs only torch, safetensors and pyyaml):

    /tmp/saelens-venv/bin/python benchmarks/check_saelens_compat.py

For each architecture: a raysae SAE with non-trivial weights is saved, loaded with
`sae_lens.SAE.load_from_disk`, and both must give the same latents and reconstructions; then
SAELens saves its copy and raysae loads that back. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysae.config import SAEConfig  # noqa: E402
from raysae.models import hook_name  # noqa: E402
from raysae.sae import SAE, SAEMetadata  # noqa: E402


def check(arch: str, tmp: Path) -> list[str]:
    import sae_lens

    torch.manual_seed(0)
    cfg = SAEConfig(architecture=arch, d_sae=96, k=8, jumprelu_threshold=0.3)
    sae = SAE(cfg, 24, metadata=SAEMetadata("pythia-70m", hook_name("resid_post", 3), 128, True))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    sae.save(tmp / "raysae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp / "raysae"), device="cpu")

    x = torch.randn(512, 24) * 2
    problems = []
    with torch.no_grad():
        ours_f, ours_r = sae.encode(x), sae(x).recon_BD
        their_f = theirs.encode(x)
        their_r = theirs.decode(their_f)
        their_fwd = theirs(x)
    for name, a, b in [
        ("latents", ours_f, their_f),
        ("recon", ours_r, their_r),
        ("forward", ours_r, their_fwd),
    ]:
        err = float((a - b).abs().max())
        if not err <= 1e-5:
            problems.append(f"{arch}: {name} differ by {err:.3g}")
    meta = theirs.cfg.metadata
    if meta.hook_name != "blocks.3.hook_resid_post" or meta.model_name != "pythia-70m":
        problems.append(f"{arch}: SAELens lost the metadata: {meta}")
    l0 = float((their_f > 0).sum(-1).float().mean())
    delta = float((ours_r - their_r).abs().max())
    name = type(theirs).__name__
    print(f"{arch:9s} -> SAELens {name:12s} max |Δ recon| = {delta:.2e}, L0 = {l0:.1f}")

    # And back: SAELens saves, raysae loads.
    theirs.save_model(str(tmp / "saelens"))
    back = SAE.load(tmp / "saelens")
    with torch.no_grad():
        err = float((back(x).recon_BD - their_r).abs().max())
    if not err <= 1e-5:
        problems.append(f"{arch}: raysae reading SAELens's save differs by {err:.3g}")
    return problems


def main() -> int:
    import sae_lens

    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    problems: list[str] = []
    for arch in ("relu", "topk", "jumprelu"):
        with tempfile.TemporaryDirectory() as tmp:
            problems += check(arch, Path(tmp))
    for p in problems:
        print("MISMATCH", p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
