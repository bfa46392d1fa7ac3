"""The toy language on disk: its Hugging Face tokenizer and its parquet corpus, tasks and variants.

A corpus file has one row per sequence of `seq_len` tokens: BOS, then whole sentences, the last
one cut at the boundary. Beside `input_ids` (list<int32>) it stores one label column per token
(`LABEL_COLUMNS`): `topic` and `template` (-1 on BOS), `pos`, `number`, `depth`, `slot` (the
`Pos`, `Number`, `Slot` enums of `raysae.toy.language`) and `sent_pos` (index in the sentence,
-1 on BOS). A variants file has the same columns plus `group` and `variant`: variant 0 is a
sampled sequence, variants 1.. are content rewrites of it, aligned token by token. A tasks file
has one row per contrastive example: `task`, `prompt` (text), `prompt_ids` (BOS first), `correct`,
`wrong` and their ids `correct_id`, `wrong_id`, and the counterfactual prompt for attribution
patching, `counter_prompt` (text) and `counter_ids` (BOS first, as long as `prompt_ids`), after
which `wrong` is the answer (see `Language.task_example`).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from raysae.toy.language import BOS, EOS, PAD, TASKS, UNK, Language, Sentence

LABEL_COLUMNS: dict[str, pa.DataType] = {
    "topic": pa.int8(), "pos": pa.int8(), "number": pa.int8(), "depth": pa.int8(),
    "template": pa.int8(), "slot": pa.int8(), "sent_pos": pa.int16(),
}
_BOS_LABELS = {"topic": -1, "pos": 0, "number": 0, "depth": 0, "template": -1, "slot": 0,
               "sent_pos": -1}


def build_tokenizer(language: Language) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the language's vocabulary that prepends BOS, like the corpus."""
    vocab = {w: i for i, w in enumerate(language.vocab)}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()  # words never contain spaces, so text <-> ids is exact
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )


def pack(sentences: list[Sentence], seq_len: int, ids: dict[str, int]) -> dict[str, list[int]]:
    """One corpus row: BOS and the sentences' tokens and labels, cut to `seq_len`."""
    row = {"input_ids": [ids[BOS]]} | {c: [v] for c, v in _BOS_LABELS.items()}
    for s in sentences:
        n = len(s.words)
        row["input_ids"] += [ids[w] for w in s.words]
        row["topic"] += [s.topic] * n
        row["template"] += [s.template] * n
        row["pos"] += s.pos
        row["number"] += s.number
        row["depth"] += s.depth
        row["slot"] += s.slot
        row["sent_pos"] += range(n)
    if len(row["input_ids"]) < seq_len:
        raise ValueError(f"sentences give {len(row['input_ids'])} tokens, fewer than {seq_len}")
    return {c: v[:seq_len] for c, v in row.items()}


def _write_rows(rows: list[dict[str, list[int] | int]], path: Path, extra: dict[str, pa.DataType]):
    types = {"input_ids": pa.list_(pa.int32())} | {
        c: pa.list_(t) for c, t in LABEL_COLUMNS.items()
    }
    schema = pa.schema([(c, t) for c, t in (extra | types).items()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_corpus(language: Language, path: Path, n_seqs: int, seq_len: int, split: str) -> None:
    """Sample `n_seqs` sequences for `split` ("train", "heldout", ...) into a parquet file."""
    rng = random.Random(f"{language.cfg.seed}:corpus:{split}")
    ids = {w: i for i, w in enumerate(language.vocab)}
    rows = [pack(language.sequence(rng, seq_len - 1), seq_len, ids) for _ in range(n_seqs)]
    _write_rows(rows, path, {})  # type: ignore[arg-type]


def write_variants(language: Language, path: Path, n_groups: int, n_variants: int,
                   seq_len: int) -> None:
    """`n_groups` sequences, each followed by `n_variants` content rewrites of it."""
    rng = random.Random(f"{language.cfg.seed}:variants")
    ids = {w: i for i, w in enumerate(language.vocab)}
    rows = []
    for g in range(n_groups):
        original = language.sequence(rng, seq_len - 1)
        rewrites = [language.rewrite_sequence(original, rng) for _ in range(n_variants)]
        versions = [original, *rewrites]
        rows += [{"group": g, "variant": v} | pack(s, seq_len, ids) for v, s in enumerate(versions)]
    _write_rows(rows, path, {"group": pa.int32(), "variant": pa.int8()})


def write_tasks(language: Language, path: Path, n_examples: int) -> None:
    """`n_examples` contrastive examples per task: prompt and counterfactual (BOS first), and the
    two candidate ids."""
    ids = {w: i for i, w in enumerate(language.vocab)}
    rows = []
    for task in TASKS:
        rng = random.Random(f"{language.cfg.seed}:tasks:{task}")
        for _ in range(n_examples):
            ex = language.task_example(task, rng)
            rows.append({
                "task": task, "prompt": " ".join(ex.prompt),
                "prompt_ids": [ids[BOS]] + [ids[w] for w in ex.prompt],
                "correct": ex.correct, "wrong": ex.wrong,
                "correct_id": ids[ex.correct], "wrong_id": ids[ex.wrong],
                "counter_prompt": " ".join(ex.counter_prompt),
                "counter_ids": [ids[BOS]] + [ids[w] for w in ex.counter_prompt],
            })
    schema = pa.schema([
        ("task", pa.string()), ("prompt", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
        ("correct", pa.string()), ("wrong", pa.string()),
        ("correct_id", pa.int32()), ("wrong_id", pa.int32()),
        ("counter_prompt", pa.string()), ("counter_ids", pa.list_(pa.int32())),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_column_NS(path: Path, column: str = "input_ids") -> torch.Tensor:
    """A list column of a corpus or variants file as a [rows, seq_len] int64 tensor."""
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    values = torch.from_numpy(col.flatten().to_numpy(zero_copy_only=False).copy()).long()
    return values.view(len(col), -1)
