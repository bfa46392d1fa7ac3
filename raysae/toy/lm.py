"""Build and train the toy GPT-NeoX (Pythia-like) language models on the toy corpus.

A plain next-token loop: AdamW, linear warm-up then cosine decay, gradient clipping, fp32 on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from raysae.config import ConfigError


@dataclass(frozen=True)
class ToyModelConfig:
    """Shape and training budget of one toy model."""

    hidden_size: int = 64
    """Residual stream width (d_model)."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    steps: int = 500
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-2
    """Peak learning rate."""
    warmup_frac: float = 0.05
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    init_seed: int = 0
    """Seed of the weights and of the batch order."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_layers", "n_heads", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 1")
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by n_heads "
                              f"{self.n_heads}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr: got {self.lr}, expected 0 < lr < 1")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"warmup_frac: got {self.warmup_frac}, expected 0..1")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: got {self.weight_decay}, expected >= 0")


class TrainResult(NamedTuple):
    """What one training run reports."""

    final_loss: float  # mean loss over the last 10% of steps
    seconds: float
    tokens: int


def build_model(cfg: ToyModelConfig, vocab_size: int, seq_len: int, bos_id: int, eos_id: int,
                pad_id: int) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX with Pythia's layout (parallel residual, 25% rotary)."""
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=seq_len, rotary_pct=0.25, use_parallel_residual=True,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.init_seed)
    return GPTNeoXForCausalLM(config)


def _lr_factor(step: int, cfg: ToyModelConfig) -> float:
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # decay to 10% of the peak


def _train_step(model: GPTNeoXForCausalLM, opt: torch.optim.Optimizer,
                batch_BS: torch.Tensor) -> float:
    loss = model(input_ids=batch_BS, labels=batch_BS).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def train_model(model: GPTNeoXForCausalLM, input_ids_NS: torch.Tensor,
                cfg: ToyModelConfig) -> TrainResult:
    """Train `model` in place on random batches of the corpus rows."""
    gen = torch.Generator().manual_seed(cfg.init_seed)
    # no weight decay on biases and layer norms, as in nanoGPT
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(cfg.steps):
        rows_B = torch.randint(len(input_ids_NS), (cfg.batch_size,), generator=gen)
        losses.append(_train_step(model, opt, input_ids_NS[rows_B]))
        sched.step()
    model.eval()
    tail = losses[-max(1, cfg.steps // 10):]
    return TrainResult(sum(tail) / len(tail), time.perf_counter() - start,
                       cfg.steps * cfg.batch_size * input_ids_NS.shape[1])
