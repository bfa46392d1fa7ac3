"""Caching throughput: the Ray Data pipeline end to end against the bare truncated forward.

Prints tokens/s of (a) `cache_activations` (token source -> LM actor -> Arrow shards on disk,
manifests included) and (b) `run_with_cache` on the same model, sites, batch size and thread
count with nothing written, and their ratio. Target: ratio >= 0.85 at d_model >= 512.

    python benchmarks/bench_caching.py [--width 512] [--layers 6] [--tokens 262144]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysae.config import CacheConfig, DataConfig, JobConfig, ModelConfig
from raysae.models import load_lm, run_with_cache


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--tokens", type=int, default=524_288)
    p.add_argument("--cache-layers", default="3,5", help="comma-separated block indices to cache")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    layers = tuple(int(x) for x in args.cache_layers.split(","))

    spec = dict(
        model_type="gpt_neox",
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64,
        intermediate_size=4 * args.width,
        vocab_size=4096,
        max_position_embeddings=args.context,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    tmp = Path(tempfile.mkdtemp(prefix="raysae-bench-"))
    # Saved and loaded back like a hub model, so the actors take the real from_pretrained path.
    load_lm(ModelConfig(name="random", from_config=spec)).save_pretrained(tmp / "model")
    model_cfg = ModelConfig(name=str(tmp / "model"))
    rows = np.random.default_rng(0).integers(
        3, 4096, size=(args.tokens // args.context, args.context)
    )
    pq.write_table(
        pa.table({"input_ids": pa.array(list(rows.astype(np.int32)))}), tmp / "tok.parquet"
    )
    job = JobConfig(
        name="bench",
        model=model_cfg,
        data=DataConfig(
            source=str(tmp / "tok.parquet"), context_length=args.context, num_tokens=args.tokens
        ),
        cache=CacheConfig(
            layers=layers,
            sites=("resid_post",),
            dtype=args.dtype,
            batch_size=args.batch_size,
            shard_tokens=65536,
            num_actors=1,
            actor_cpus=float(threads),
            use_gpu=args.gpu,
        ),
        runs_dir=str(tmp),
    )
    device = "cuda" if args.gpu else "cpu"
    sites = [("resid_post", i) for i in layers]

    # (b) the bare truncated forward, same batches, nothing kept
    model = load_lm(model_cfg, device)
    ids = torch.from_numpy(rows).long()
    run_with_cache(model, ids[: args.batch_size].to(device), sites)  # warm-up
    if args.gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(ids), args.batch_size):
        out = run_with_cache(model, ids[s : s + args.batch_size].to(device), sites)
        for x in out.values():
            x.sum().item() if args.gpu else None
    bare = args.tokens / (time.perf_counter() - t0)
    del model

    # (a) the pipeline, end to end (Ray already started, as on a cluster)
    import ray

    from raysae.distributed.caching import cache_activations

    ray.init(
        address="local",
        num_cpus=threads,
        num_gpus=1 if args.gpu else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    t0 = time.perf_counter()
    cache_activations(job)
    pipe = args.tokens / (time.perf_counter() - t0)
    ray.shutdown()
    shard_bytes = sum(f.stat().st_size for f in (tmp / "activations").rglob("*.arrow"))

    print(
        f"model: GPT-NeoX width {args.width}, {args.layers} layers, context {args.context}; "
        f"caching resid_post of layers {list(layers)} as {args.dtype}; {threads} threads; {device}"
    )
    print(f"tokens: {args.tokens}; shards written: {shard_bytes / 1e6:.0f} MB")
    print(f"{'bare truncated forward':<28}{bare:>12,.0f} tokens/s")
    print(f"{'caching pipeline (Ray Data)':<28}{pipe:>12,.0f} tokens/s")
    print(f"{'ratio':<28}{pipe / bare:>12.2f}   (target >= 0.85)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
