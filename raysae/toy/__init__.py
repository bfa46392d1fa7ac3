"""A synthetic language with known latent structure and a small/large GPT-NeoX pair trained on it.

Stands in for Pythia-70m/160m where nothing can be downloaded: `ensure_toy_pair(preset("default"))`
returns the paths of a tokenizer, two models loadable with `AutoModelForCausalLM.from_pretrained`,
a labelled parquet corpus, contrastive tasks, content-rewritten variants and a report.
"""

from raysae.toy.corpus import LABEL_COLUMNS, build_tokenizer, read_column_NS
from raysae.toy.evaluate import (
    ProbeResult,
    heldout_ce,
    task_accuracies,
    task_accuracy,
    topic_known_NS,
    topic_probe,
    unigram_entropy,
)
from raysae.toy.language import (
    TASKS,
    TEMPLATES,
    Language,
    LanguageConfig,
    Number,
    Pos,
    Sentence,
    Slot,
    TaskExample,
)
from raysae.toy.lm import ToyModelConfig
from raysae.toy.pair import PRESETS, ToyPairConfig, ToyPaths, config_key, ensure_toy_pair, preset

__all__ = [
    "LABEL_COLUMNS", "PRESETS", "TASKS", "TEMPLATES", "Language", "LanguageConfig", "Number",
    "Pos", "ProbeResult", "Sentence", "Slot", "TaskExample", "ToyModelConfig", "ToyPairConfig",
    "ToyPaths", "build_tokenizer", "config_key", "ensure_toy_pair", "heldout_ce", "preset",
    "read_column_NS", "task_accuracies", "task_accuracy", "topic_known_NS", "topic_probe",
    "unigram_entropy",
]
