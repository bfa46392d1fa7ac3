"""Many SAEs per pass: a streamed group against its bound and against separate cached fits.

On the real Pythia-160M shape (the shipped config, random weights: 12 layers, d_model 768) with
a ReLU SAE of width 6144 on every layer's resid_post, this times, on one process (no Ray):

- the bound: one truncated forward (all 12 sites) plus the 12 SAE training steps, each timed
  alone on the same batch;
- the streamed group: `raysae.sources` running the forward chunk by chunk and handing every
  site to its SAE's `Trainer` (what a streamed group's worker does);
- 12 separate cached fits: one caching pass (the forward, 12 shards written with checksums)
  then each SAE trained alone on its shards read back (what 12 cached Ray Train fits do,
  without their ~15 s of start-up each).

Prints tokens/s of each, the group against the bound (target >= 0.85) and against the cached
fits. A short context and token count keep it to minutes on 2 cores; `--device cuda --bf16`
runs the same on a GPU.

    python benchmarks/bench_streamed_group.py [--tokens 8192] [--context 128] [--batch 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raysae import shards
from raysae.config import ModelConfig, SAEConfig, TrainConfig
from raysae.models import SHIPPED_CONFIGS, hook_name, load_lm, run_with_cache
from raysae.sae import SAE
from raysae.shards import ActivationReader
from raysae.sources import (
    LMActivations,
    StreamSettings,
    batches_from_chunks,
    cached_chunks,
    streamed_chunks,
)
from raysae.train import sae_trainer


def trainers(sites, d, cfg: TrainConfig, sae_cfg: SAEConfig, device):
    out = {}
    for site in sites:
        sae = SAE(sae_cfg, d, device=device)
        out[hook_name(*site)] = sae_trainer(sae, cfg)
    return out


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024, help="SAE batch (tokens per step)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the SAE steps")
    args = p.parse_args()
    device = torch.device(args.device)
    hf = json.loads((SHIPPED_CONFIGS / "EleutherAI__pythia-160m-deduped.json").read_text())
    hf["num_hidden_layers"] = max(args.layers, 1)
    model_cfg = ModelConfig(name="pythia-160m-shape", from_config=hf)
    lm = load_lm(model_cfg, device)
    d = hf["hidden_size"]
    sites = [("resid_post", i) for i in range(args.layers)]
    sae_cfg = SAEConfig(architecture="relu", expansion_factor=args.expansion)
    n_seq = args.tokens // args.context
    rng = np.random.default_rng(0)
    windows = rng.integers(3, hf["vocab_size"], size=(n_seq, args.context)).astype(np.int32)
    cfg = TrainConfig(num_tokens=args.tokens, batch_size=args.batch, lr=3e-5, log_every_steps=10**6,
                      lr_warmup_frac=0.0, lr_decay_frac=0.0, l1_warmup_frac=0.0,
                      autocast_bf16=args.bf16)
    seqs_per_chunk = max(1, args.batch // args.context)
    steps = args.tokens // args.batch
    torch.manual_seed(0)

    # the bound: the forward and each SAE step timed alone, on the same batches
    ids = torch.from_numpy(windows[:seqs_per_chunk]).long().to(device)
    run_with_cache(lm, ids, sites)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        acts = run_with_cache(lm, ids, sites)
    sync(device)
    forward_s = time.perf_counter() - t
    x = {h: v.reshape(-1, d).float() for h, v in acts.items()}
    group = trainers(sites, d, cfg, sae_cfg, device)
    step_s = 0.0
    for h, tr in group.items():
        tr.step(x[h])  # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(steps - 1):
            tr.step(x[h])
        sync(device)
        step_s += (time.perf_counter() - t) * steps / (steps - 1)
    bound = args.tokens / (forward_s + step_s)

    # the streamed group: the forward chunk by chunk, every site to its trainer
    lm_acts = LMActivations(lm, sites, [], forward_batch=seqs_per_chunk, device=device)
    chunks = streamed_chunks(lm_acts, lambda: iter(windows), seqs_per_chunk, 0, 1)
    group = trainers(sites, d, cfg, sae_cfg, device)
    settings = StreamSettings(batch_size=args.batch, shuffle=True, passes=1)
    sync(device)
    t = time.perf_counter()
    for batch in batches_from_chunks(chunks, settings):
        for h, tr in group.items():
            tr.step(batch[h])
    sync(device)
    streamed_s = time.perf_counter() - t
    streamed = args.tokens / streamed_s

    # 12 separate cached fits: one caching pass, then each SAE alone on its shards
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {hook_name(*s): Path(tmp) / hook_name(*s) for s in sites}
        for d_ in dirs.values():
            d_.mkdir()
        sync(device)
        t = time.perf_counter()
        infos: dict[str, list] = {h: [] for h in dirs}
        for c, start in enumerate(range(0, n_seq, seqs_per_chunk)):
            ids = torch.from_numpy(windows[start : start + seqs_per_chunk]).long().to(device)
            n = ids.numel()
            tok = ids.reshape(-1).cpu().numpy().astype(np.int32)
            pos = np.tile(np.arange(args.context, dtype=np.int32), len(ids))
            seq = np.repeat(np.arange(start, start + len(ids), dtype=np.int64), args.context)
            for h, v in run_with_cache(lm, ids, sites).items():
                buf = shards.shard_bytes(v.reshape(n, d).float().cpu(), tok, pos, seq, "float32")
                infos[h].append(shards.write_shard(dirs[h], f"shard-{c:09d}.arrow", buf, n))
        for h, site in zip(dirs, sites):
            shards.write_manifest(dirs[h], shards.Manifest(
                model="bench", revision=None, site=site[0], layer=site[1], hook_name=h, d_model=d,
                dtype="float32", context_length=args.context, dataset="random",
                fingerprint="bench", num_tokens=args.tokens, shards=tuple(infos[h]),
                exclude_special=False))
        cache_s = time.perf_counter() - t
        group = trainers(sites, d, cfg, sae_cfg, device)
        t = time.perf_counter()
        for h, tr in group.items():
            readers = {h: ActivationReader(dirs[h])}
            for batch in batches_from_chunks(cached_chunks(readers, 0, 1, True), settings):
                tr.step(batch[h].to(device))
        sync(device)
        fits_s = time.perf_counter() - t
    cached = args.tokens / (cache_s + fits_s)

    print(f"Pythia-160M shape, {args.layers} layers x ReLU SAE d_sae {args.expansion * d}, "
          f"{args.tokens:,} tokens, batch {args.batch}, context {args.context}, "
          f"{torch.get_num_threads()} threads, {device}{' bf16' if args.bf16 else ''}")
    print(f"bound (forward {forward_s:.1f} s + {args.layers} SAE steps {step_s:.1f} s): "
          f"{bound:,.0f} tokens/s")
    print(f"streamed group: {streamed:,.0f} tokens/s = {streamed / bound:.2f} of the bound")
    print(f"{args.layers} cached fits (cache {cache_s:.1f} s + fits {fits_s:.1f} s): "
          f"{cached:,.0f} tokens/s; the streamed group is {streamed / cached:.2f}x")
    print(json.dumps({"bound": bound, "streamed": streamed, "cached_fits": cached,
                      "of_bound": streamed / bound, "vs_cached": streamed / cached}))


if __name__ == "__main__":
    main()
