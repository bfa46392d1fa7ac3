"""SAE training throughput against the matmul bound (a script, not a test).

For each architecture, times raysae's full training step, `raysae.train.train_step` as the
training loop runs it (forward, backward, clipping, Adam, decoder renormalisation, the
dead-latent counter and the per-step metric values), and compares it with "the bound": the same step's dense matrix
products alone, timed with bare `torch.mm` on tensors of the same shapes:

    encoder   x[B,D] @ W_enc[D,F]            decoder  f[B,F] @ W_dec[F,D]
    backward  g[B,D] @ W_dec^T[D,F]  (df)    f^T[F,B] @ g[B,D]  (dW_dec)
              x^T[D,B] @ g_pre[B,F]  (dW_enc)

A ReLU or JumpReLU step cannot beat this (every product is needed); the k architectures (TopK,
BatchTopK, Matryoshka BatchTopK) can, because they decode and back-propagate through the active
latents only. `topk (dense decode)` times the same TopK loss through a dense [B, F] decode, for
contrast. `+auxk` rows add the AuxK loss with a quarter of the latents held dead (every fourth,
marked dead again before each step, in SAELens's trainer too); Matryoshka's prefixes are F/8,
F/4, F/2 and F.

    python benchmarks/bench_sae_train.py [--d-in 512 --d-sae 4096 --batch 4096 --k 64]
    python benchmarks/bench_sae_train.py --saelens-python .venv/bin/python

With `--saelens-python`, the same configurations also run through SAELens's own
`SAETrainer._train_step` in that interpreter (a venv with sae-lens installed: this project's own
has it), for every architecture SAELens has.

Figures: see the README's Benchmarks section (measured on the 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from raysae.config import SAEConfig, TrainConfig
from raysae.sae import SAE
from raysae.train import SAELearner, make_optimizer, train_step

DEVICE = torch.device("cpu")
DTYPE = torch.float32  # the dtype of the bound's products (bf16 with --bf16)


def bound_step(B: int, D: int, F: int) -> Callable[[], None]:
    """The five dense products of one ReLU SAE step, as bare torch.mm calls."""
    kw = dict(device=DEVICE, dtype=DTYPE)
    x_BD, g_BD = torch.randn(B, D, **kw), torch.randn(B, D, **kw)
    f_BF, g_BF = torch.randn(B, F, **kw), torch.randn(B, F, **kw)
    W_enc_DF, W_dec_FD = torch.randn(D, F, **kw), torch.randn(F, D, **kw)

    def products() -> None:
        torch.mm(x_BD, W_enc_DF)
        torch.mm(f_BF, W_dec_FD)
        torch.mm(g_BD, W_dec_FD.t())
        torch.mm(f_BF.t(), g_BD)
        torch.mm(x_BD.t(), g_BF)

    return products


def matryoshka_widths(F: int) -> tuple[int, ...]:
    return (F // 8, F // 4, F // 2, F)


def raysae_step(
    name: str, B: int, D: int, F: int, k: int, dense: bool = False
) -> Callable[[], None]:
    """One raysae training step of `name` (an architecture, `+auxk` for the AuxK loss on a
    quarter of the latents held dead; dense=True: the TopK loss through a dense decode)."""
    arch, auxk = name.removesuffix("+auxk"), name.endswith("+auxk")
    # the Matryoshka widths are read by matryoshka_batchtopk only (the others ignore them)
    sae_cfg = SAEConfig(architecture=arch, d_sae=F, k=k, l1_coefficient=5.0,
                        matryoshka_widths=matryoshka_widths(F),
                        aux_coefficient=1 / 32 if auxk else 0.0)
    sae = SAE(sae_cfg, D, device=DEVICE)
    bf16 = DTYPE == torch.bfloat16
    # No warm-ups: step 0 runs at the peak lr and the full sparsity coefficient.
    cfg = TrainConfig(num_tokens=B * 1000, batch_size=B, lr=3e-5, lr_warmup_frac=0.0,
                      l1_warmup_frac=0.0, autocast_bf16=bf16)
    opt = make_optimizer(sae, cfg)
    x_BD = torch.randn(B, D, device=DEVICE)
    if not dense:
        learner = SAELearner(sae, cfg)
        if not auxk:
            return lambda: train_step(learner, opt, x_BD, 0, cfg.lr, cfg.grad_clip)

        def auxk_step() -> None:
            learner.since_F[::4] = cfg.dead_window_tokens
            train_step(learner, opt, x_BD, 0, cfg.lr, cfg.grad_clip)

        return auxk_step

    def dense_step() -> None:
        out = sae(x_BD, 5.0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(list(sae.parameters()), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()

    return dense_step


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round.

    Interleaving puts every candidate under the same machine load in each round, so per-round
    ratios stay meaningful on a shared machine even when absolute times drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """The device's measured dense matmul throughput in DTYPE (a large square product)."""
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    torch.mm(a, b)
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    _sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


SAELENS_SCRIPT = r"""
import json, sys, time, torch
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
import sae_lens
B, D, F, k, rounds, warmup, threads = (int(a) for a in sys.argv[1:8])
torch.set_num_threads(threads)
torch.manual_seed(0)
x = torch.randn(B, D)
xb, gb = torch.randn(B, D), torch.randn(B, D)
fb, gfb = torch.randn(B, F), torch.randn(B, F)
We, Wd = torch.randn(D, F), torch.randn(F, D)
def bound():
    torch.mm(xb, We); torch.mm(fb, Wd); torch.mm(gb, Wd.t()); torch.mm(fb.t(), gb)
    torch.mm(xb.t(), gfb)
def trainer_step(sae, dead=False):
    cfg = SAETrainerConfig(total_training_samples=B * 10**6, train_batch_size_samples=B,
                           lr=3e-5, lr_end=3e-6, adam_beta1=0.0, adam_beta2=0.999)
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    def step():
        if dead:  # a quarter of the latents dead, as in raysae's +auxk rows
            trainer.n_forward_passes_since_fired[::4] = trainer.cfg.dead_feature_window + 1
        trainer._train_step(sae, x)
    return step
widths = [F // 8, F // 4, F // 2, F]
aux = dict(aux_loss_coefficient=1 / 32)
fns = {
    "bound": bound,
    "relu (standard)": trainer_step(StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=D, d_sae=F, l1_coefficient=5.0))),
    "topk": trainer_step(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=k))),
    "topk (use_sparse_activations)": trainer_step(TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=D, d_sae=F, k=k, use_sparse_activations=True))),
    "jumprelu": trainer_step(JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=F, l0_coefficient=5.0))),
    "batchtopk": trainer_step(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=D, d_sae=F, k=k))),
    "matryoshka_batchtopk": trainer_step(MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=k, matryoshka_widths=widths))),
    "topk+auxk": trainer_step(TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=D, d_sae=F, k=k, **aux)), dead=True),
}
errors = {}
for n, fn in list(fns.items()):
    try:
        for _ in range(warmup):
            fn()
    except Exception as e:  # a configuration SAELens cannot run here: report, don't abort
        errors[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        del fns[n]
times = {n: [] for n in fns}
for _ in range(rounds):
    for n, fn in fns.items():
        t0 = time.perf_counter(); fn(); times[n].append(time.perf_counter() - t0)
med = lambda xs: sorted(xs)[len(xs) // 2]
out = {n: med(ts) for n, ts in times.items()}
out["ratio"] = {n: med([b / t for b, t in zip(times["bound"], ts)]) for n, ts in times.items()}
out["version"] = sae_lens.__version__
out["errors"] = errors
print(json.dumps(out))
"""


def saelens_seconds(python: str, B: int, D: int, F: int, k: int, steps: int, warmup: int) -> dict:
    args = [str(v) for v in (B, D, F, k, steps, warmup, torch.get_num_threads())]
    res = subprocess.run(
        [python, "-c", SAELENS_SCRIPT, *args], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"SAELens run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--archs",
                   default="relu,topk,jumprelu,batchtopk,matryoshka_batchtopk,topk+auxk")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--saelens-python", default=None, help="python of a venv with sae-lens")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (and a bf16 bound)")
    a = p.parse_args(argv)
    global DEVICE, DTYPE
    DEVICE = torch.device(a.device)
    DTYPE = torch.bfloat16 if a.bf16 else torch.float32
    if a.threads:
        torch.set_num_threads(a.threads)
    B, D, F, k = a.batch, a.d_in, a.d_sae, a.k
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"B={B} d_in={D} d_sae={F} k={k} threads={threads} torch={torch.__version__} "
          f"device={DEVICE} dtype={DTYPE}")

    fns: dict[str, Callable[[], object]] = {"bound (5 dense matmuls)": bound_step(B, D, F)}
    for arch in a.archs.split(","):
        fns[arch] = raysae_step(arch, B, D, F, k)
        if arch == "topk":
            fns["topk (dense decode)"] = raysae_step(arch, B, D, F, k, dense=True)
    times = time_interleaved(fns, a.rounds, a.warmup)
    bound = times["bound (5 dense matmuls)"]
    rows = [
        (name, _median(ts), _median([b / t for b, t in zip(bound, ts)]))
        for name, ts in times.items()
    ]
    if a.saelens_python:
        sl = saelens_seconds(a.saelens_python, B, D, F, k, a.rounds, a.warmup)
        version, ratio, errors = sl.pop("version"), sl.pop("ratio"), sl.pop("errors")
        rows += [(f"SAELens {version} {n}", t, ratio[n]) for n, t in sl.items()]

    print(f"{'step':<44}{'ms/step':>10}{'tokens/s':>12}{'of bound':>10}")
    for name, t, frac in rows:
        print(f"{name:<44}{t * 1e3:>10.1f}{B / t:>12,.0f}{frac:>10.2f}")
    print("(of bound: median over rounds of bound time / step time, measured in the same round)")
    if DEVICE.type == "cuda":
        peak = matmul_peak_tflops(n=8192)
        step_flops = 10 * B * D * F  # the five products of the bound
        print(f"measured matmul peak: {peak:.1f} TFLOP/s ({DTYPE})")
        for name, t, _ in rows:
            print(f"{name:<44}{step_flops / t / 1e12:>8.1f} TFLOP/s  {step_flops / t / 1e12 / peak:>5.2f} of peak")
    if a.saelens_python:
        for name, err in errors.items():
            print(f"SAELens {name}: could not run ({err})")


if __name__ == "__main__":
    main(sys.argv[1:])
