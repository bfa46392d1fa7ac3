"""The toy model pair: build (or reuse) the tokenizer, corpus, tasks and both trained models.

`ensure_toy_pair(cfg, root)` keys a directory by a hash of the config and the file format, builds
it in a temporary directory and renames it into place, so concurrent callers never see a half
written pair and a second call reuses the first one's work:

    <root>/<key>/tokenizer/         AutoTokenizer.from_pretrained works here
    <root>/<key>/small/, large/     AutoModelForCausalLM + AutoTokenizer.from_pretrained work here
    <root>/<key>/corpus.parquet     training rows: input_ids + per-token labels (see corpus.py)
    <root>/<key>/heldout.parquet    held-out rows, same columns
    <root>/<key>/variants.parquet   sequences and their content rewrites, aligned token by token
    <root>/<key>/tasks.parquet      contrastive examples of every task, with counterfactuals
    <root>/<key>/language.json      the lexicon, templates and label enums
    <root>/<key>/report.json        baselines and both models' figures
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from raysae.config import ConfigError, digest
from raysae.toy.corpus import (
    build_tokenizer,
    read_column_NS,
    write_corpus,
    write_tasks,
    write_variants,
)
from raysae.toy.evaluate import (
    heldout_ce,
    task_accuracies,
    topic_known_NS,
    topic_probe,
    unigram_entropy,
)
from raysae.toy.language import TEMPLATES, Language, LanguageConfig, Number, Pos, Slot
from raysae.toy.lm import ToyModelConfig, build_model, train_model

FORMAT_VERSION = 2  # 2: tasks carry counterfactual prompts
"""Bump when the generator, the file layout or the training changes: old caches are not reused."""


@dataclass(frozen=True)
class ToyPairConfig:
    """The toy language, its corpus sizes and the two models trained on it."""

    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Generator settings of the language."""
    small: ToyModelConfig = field(default_factory=lambda: ToyModelConfig(64, 4, 4, steps=450))
    """The small model (stitching's model A)."""
    large: ToyModelConfig = field(
        default_factory=lambda: ToyModelConfig(128, 6, 4, steps=500, lr=6e-3))
    """The large model (stitching's model B)."""
    seq_len: int = 128
    """Tokens per corpus row, BOS included."""
    n_train_seqs: int = 8192
    """Rows of the training corpus."""
    n_heldout_seqs: int = 256
    """Rows of the held-out corpus (CE and the topic probe)."""
    n_task_examples: int = 256
    """Contrastive examples per task."""
    n_variant_groups: int = 64
    """Sequences in the variants file."""
    n_variants: int = 3
    """Content rewrites per sequence in the variants file."""

    def __post_init__(self) -> None:
        if self.seq_len < 16:
            raise ConfigError(f"seq_len: got {self.seq_len}, expected >= 16")
        for name in ("n_train_seqs", "n_heldout_seqs", "n_task_examples", "n_variant_groups"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 2")
        if self.n_variants < 1:
            raise ConfigError(f"n_variants: got {self.n_variants}, expected >= 1")


PRESETS: dict[str, ToyPairConfig] = {
    "default": ToyPairConfig(),
    # small enough for a session-scoped pytest fixture, still clearly above every baseline
    "test": ToyPairConfig(
        language=LanguageConfig(n_topics=3, nouns_per_topic=4, verbs_per_topic=3,
                                adjectives_per_topic=2, n_names=5, n_numbers=12, cast_size=3,
                                template_weights=(1.0, 1.0, 3.0, 1.0, 2.0)),
        small=ToyModelConfig(32, 3, 2, steps=600),
        large=ToyModelConfig(48, 3, 2, steps=600, lr=6e-3),
        seq_len=64, n_train_seqs=2048, n_heldout_seqs=128, n_task_examples=128,
        n_variant_groups=16, n_variants=2,
    ),
}


def preset(name: str) -> ToyPairConfig:
    """A named preset of `PRESETS`."""
    if name not in PRESETS:
        raise ConfigError(f"toy preset: got {name!r}, expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def config_key(cfg: ToyPairConfig) -> str:
    """The cache directory name of a config: a short hash of it and of the file format."""
    return digest({"format": FORMAT_VERSION, "config": dataclasses.asdict(cfg)})


@dataclass(frozen=True)
class ToyPaths:
    """Where the files of a built toy pair lie, and whether this call built it (False: reused)."""

    dir: Path
    built: bool
    tokenizer: Path
    small: Path
    large: Path
    corpus: Path
    heldout: Path
    variants: Path
    tasks: Path
    language: Path
    report: Path

    @classmethod
    def at(cls, directory: Path, built: bool) -> ToyPaths:
        """The paths of the pair in `directory`."""
        d = directory
        return cls(d, built, d / "tokenizer", d / "small", d / "large", d / "corpus.parquet",
                   d / "heldout.parquet", d / "variants.parquet", d / "tasks.parquet",
                   d / "language.json", d / "report.json")

    def read_report(self) -> dict[str, Any]:
        """The report.json written when the pair was built."""
        return json.loads(self.report.read_text())


def ensure_toy_pair(cfg: ToyPairConfig, root: str | Path = "runs/toy") -> ToyPaths:
    """Build the toy pair of `cfg` under `root`, or reuse the one already there."""
    root = Path(root)
    final = root / config_key(cfg)
    if (final / "report.json").exists():
        return ToyPaths.at(final, built=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        build_toy_pair(cfg, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its build into place first: use that one
            if not (final / "report.json").exists():
                raise
            shutil.rmtree(tmp)
            return ToyPaths.at(final, built=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ToyPaths.at(final, built=True)


def _lexicon(language: Language) -> dict[str, Any]:
    return {
        "topics": [{"nouns": language.nouns[t], "verbs": language.verbs[t],
                    "adjectives": language.adjectives[t]} for t in range(language.cfg.n_topics)],
        "names": language.names, "numbers": language.numbers, "templates": TEMPLATES,
        "labels": {e.__name__.lower(): {m.name: int(m) for m in e} for e in (Pos, Number, Slot)},
    }


def build_toy_pair(cfg: ToyPairConfig, out: Path) -> dict[str, Any]:
    """Write every file of the pair into the directory `out` and return the report."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # the build may use every core it is given, unless OMP_NUM_THREADS says otherwise (Ray
    # workers, or a machine shared with other jobs, where spinning threads slow everyone down)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
    try:
        language = Language(cfg.language)
        tokenizer = build_tokenizer(language)
        tokenizer.save_pretrained(out / "tokenizer")
        (out / "language.json").write_text(json.dumps(_lexicon(language), indent=1))
        write_corpus(language, out / "corpus.parquet", cfg.n_train_seqs, cfg.seq_len, "train")
        write_corpus(language, out / "heldout.parquet", cfg.n_heldout_seqs, cfg.seq_len, "heldout")
        write_variants(language, out / "variants.parquet", cfg.n_variant_groups, cfg.n_variants,
                       cfg.seq_len)
        write_tasks(language, out / "tasks.parquet", cfg.n_task_examples)
        train_NS = read_column_NS(out / "corpus.parquet")
        heldout_NS = read_column_NS(out / "heldout.parquet")
        report: dict[str, Any] = {
            "key": config_key(cfg),
            "config": dataclasses.asdict(cfg),
            "vocab_size": len(language.vocab),
            "train_tokens": train_NS.numel(),
            "unigram_entropy_nats": unigram_entropy(train_NS),
            "data_seconds": time.perf_counter() - start,
            "models": {},
        }
        for name, model_cfg in (("small", cfg.small), ("large", cfg.large)):
            model = build_model(model_cfg, len(language.vocab), cfg.seq_len,
                                tokenizer.bos_token_id, tokenizer.eos_token_id,
                                tokenizer.pad_token_id)
            result = train_model(model, train_NS, model_cfg)
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            report["models"][name] = _evaluate(model, result._asdict(), out, heldout_NS,
                                               tokenizer.pad_token_id, model_cfg.n_layers // 2)
        report["total_seconds"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _evaluate(model: torch.nn.Module, train: dict[str, Any], out: Path, heldout_NS: torch.Tensor,
              pad_id: int, layer: int) -> dict[str, Any]:
    held = out / "heldout.parquet"
    known_NS = topic_known_NS(read_column_NS(held, "pos"), read_column_NS(held, "sent_pos"))
    probe = topic_probe(model, heldout_NS, read_column_NS(held, "topic"), layer, known_NS)
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "train": train,
        "heldout_ce_nats": heldout_ce(model, heldout_NS),
        "task_accuracy": task_accuracies(model, pq.read_table(out / "tasks.parquet"), pad_id),
        "topic_probe": probe._asdict(),
    }
