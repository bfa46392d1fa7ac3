"""The toy language and model pair: determinism, labels, tokenizer, training, tasks, cache."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysae.config import ConfigError
from raysae.toy import (
    TASKS,
    TEMPLATES,
    Language,
    LanguageConfig,
    Number,
    Pos,
    Slot,
    ToyModelConfig,
    ToyPairConfig,
    ToyPaths,
    config_key,
    ensure_toy_pair,
    preset,
    read_column_NS,
    task_accuracies,
    topic_known_NS,
    topic_probe,
)
from raysae.toy.corpus import write_corpus

TEST_LANGUAGE = preset("test").language


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_generator_is_deterministic_per_seed(tmp_path: Path) -> None:
    a, b = Language(TEST_LANGUAGE), Language(TEST_LANGUAGE)
    other = Language(LanguageConfig(**{**TEST_LANGUAGE.__dict__, "seed": 1}))
    assert a.vocab == b.vocab and a.vocab != other.vocab

    def text(lang: Language, seed: int) -> list[tuple[str, ...]]:
        return [s.words for s in lang.sequence(random.Random(seed), 200)]

    assert text(a, 0) == text(b, 0) and text(a, 0) != text(a, 1)
    for name, lang in (("a", a), ("b", b), ("c", other)):
        write_corpus(lang, tmp_path / f"{name}.parquet", 8, 32, "train")
    tables = [pq.read_table(tmp_path / f"{n}.parquet") for n in "abc"]
    assert tables[0].equals(tables[1]) and not tables[0].equals(tables[2])


def test_corpus_schema(toy_pair: ToyPaths, tmp_path: Path) -> None:
    cfg = preset("test")
    table = pq.read_table(toy_pair.corpus)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("topic").type == pa.list_(pa.int8())
    assert table.schema.field("sent_pos").type == pa.list_(pa.int16())
    ids_NS = read_column_NS(toy_pair.corpus)
    assert ids_NS.shape == (cfg.n_train_seqs, cfg.seq_len)
    bos = AutoTokenizer.from_pretrained(toy_pair.tokenizer).bos_token_id
    assert (ids_NS[:, 0] == bos).all() and not (ids_NS[:, 1:] == bos).any()
    datasets = pytest.importorskip("datasets")  # the main pipeline reads it this way
    ds = datasets.load_dataset("parquet", data_files=str(toy_pair.corpus), split="train",
                               cache_dir=str(tmp_path))
    assert ds[0]["input_ids"] == ids_NS[0].tolist()


def test_labels_match_tokens(toy_pair: ToyPaths) -> None:
    lang = Language(TEST_LANGUAGE)
    rows = _rows(toy_pair.corpus)[:200]
    counts = {p: 0 for p in Pos}
    for row in rows:
        words = [lang.vocab[i] for i in row["input_ids"]]
        depth = 0
        for i, w in enumerate(words):
            topic, pos, number = row["topic"][i], Pos(row["pos"][i]), Number(row["number"][i])
            counts[pos] += 1
            if i == 0:
                assert (topic, pos, row["slot"][i], row["sent_pos"][i]) == (-1, Pos.NONE, 0, -1)
                continue
            assert 0 <= topic < TEST_LANGUAGE.n_topics
            if pos == Pos.NOUN:
                assert w == lang.nouns[topic][lang.info[w].index][number == Number.PLUR]
                assert w.endswith("s") == (number == Number.PLUR)
            elif pos == Pos.VERB:
                assert w == lang.verbs[topic][lang.info[w].index][number == Number.PLUR]
                assert w.endswith("s") == (number == Number.SING)
            elif pos == Pos.ADJ:
                assert w in lang.adjectives[topic]
            elif pos == Pos.NAME:
                assert w in lang.names and number == Number.SING
            elif pos == Pos.NUM:
                assert w in lang.numbers
            else:
                assert lang.info[w].pos == pos and lang.info[w].topic == -1
            # brackets carry their inside's depth: it rises at "(" and falls after ")"
            depth += pos == Pos.OPEN
            assert row["depth"][i] == depth
            if pos == Pos.OPEN:
                assert row["depth"][i] == row["depth"][i - 1] + 1
            if pos == Pos.CLOSE:
                depth -= 1
                if i + 1 < len(words):
                    assert row["depth"][i + 1] == row["depth"][i] - 1
            if w == ".":
                assert depth == 0
    assert all(counts[p] > 0 for p in (Pos.NOUN, Pos.VERB, Pos.ADJ, Pos.NAME, Pos.NUM, Pos.OPEN))


def test_subject_verb_agreement_in_text() -> None:
    lang = Language(TEST_LANGUAGE)
    rng = random.Random(0)
    for _ in range(200):
        s = lang.sentence(rng, rng.randrange(TEST_LANGUAGE.n_topics), "attractor")
        subj = next(i for i, (p, sl) in enumerate(zip(s.pos, s.slot))
                    if p == Pos.NOUN and sl == Slot.SUBJ)
        verb = s.slot.index(Slot.VERB)
        assert s.number[subj] == s.number[verb] != Number.NONE


def test_tokenizer_round_trips(toy_pair: ToyPaths) -> None:
    lang = Language(TEST_LANGUAGE)
    for where in (toy_pair.tokenizer, toy_pair.small, toy_pair.large):
        tok = AutoTokenizer.from_pretrained(where)
        assert tok.get_vocab() == {w: i for i, w in enumerate(lang.vocab)}
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
            "<bos>", "<eos>", "<pad>", "<unk>")
    row = _rows(toy_pair.corpus)[0]["input_ids"]
    text = tok.decode(row, skip_special_tokens=True)
    assert tok(text)["input_ids"] == row  # BOS is prepended like in the corpus
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert tok("the zzzz")["input_ids"][-1] == tok.unk_token_id


def test_content_rewrite_keeps_template_and_changes_topic_words() -> None:
    lang = Language(TEST_LANGUAGE)
    rng = random.Random(0)
    for template in TEMPLATES:
        for _ in range(20):
            s = lang.sentence(rng, 0, template)
            r = lang.rewrite(s, 1, rng)
            assert (r.template, r.pos, r.number, r.depth, r.slot) == (
                s.template, s.pos, s.number, s.depth, s.slot)
            assert r.topic == 1 and len(r.words) == len(s.words)
            for old, new in zip(s.words, r.words):
                info = lang.info[old]
                if info.topic < 0:  # frame words, names and numbers stay
                    assert new == old
                else:
                    assert lang.info[new].topic == 1 and new != old
                    assert (lang.info[new].pos, lang.info[new].number) == (info.pos, info.number)
    # the induction template repeats its names, and a rewrite keeps them repeated
    s = lang.sentence(rng, 0, "induction")
    assert lang.rewrite(s, 2, rng).words[:2] == s.words[:2]


def test_variants_file_is_aligned(toy_pair: ToyPaths) -> None:
    rows = _rows(toy_pair.variants)
    cfg = preset("test")
    assert len(rows) == cfg.n_variant_groups * (cfg.n_variants + 1)
    for group in range(cfg.n_variant_groups):
        mine = [r for r in rows if r["group"] == group]
        base = mine[0]
        assert base["variant"] == 0
        for r in mine[1:]:
            for col in ("pos", "number", "depth", "slot", "template", "sent_pos"):
                assert r[col] == base[col]
            assert all(a != b for a, b in zip(r["topic"][1:], base["topic"][1:]))
            assert r["input_ids"] != base["input_ids"]


def test_models_load_and_beat_the_unigram_baseline(toy_pair: ToyPaths) -> None:
    report = toy_pair.read_report()
    entropy = report["unigram_entropy_nats"]
    print(f"\nunigram entropy {entropy:.3f} nats")
    heldout_NS = read_column_NS(toy_pair.heldout)
    for name in ("small", "large"):
        model = AutoModelForCausalLM.from_pretrained(getattr(toy_pair, name)).eval()
        with torch.no_grad():
            ce = model(input_ids=heldout_NS[:32], labels=heldout_NS[:32]).loss.item()
        reported = report["models"][name]["heldout_ce_nats"]
        print(f"{name}: held-out CE {ce:.3f} (report {reported:.3f})")
        assert ce < entropy - 1.0
        assert ce == pytest.approx(reported, abs=0.1)


@pytest.mark.parametrize("name", ["small", "large"])
def test_models_solve_contrastive_tasks(toy_pair: ToyPaths, name: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(getattr(toy_pair, name)).eval()
    tasks = pq.read_table(toy_pair.tasks)
    assert set(tasks.column("task").to_pylist()) == set(TASKS)
    accuracy = task_accuracies(model, tasks, pad_id=model.config.pad_token_id)
    print(f"\n{name}: " + " ".join(f"{t}={a:.2f}" for t, a in accuracy.items()))
    for task, acc in accuracy.items():
        assert acc >= 0.7, f"{name} fails {task}: accuracy {acc:.2f}"
    assert accuracy == pytest.approx(toy_pair.read_report()["models"][name]["task_accuracy"])


@pytest.mark.parametrize("name", ["small", "large"])
def test_topic_probe_beats_chance(toy_pair: ToyPaths, name: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(getattr(toy_pair, name)).eval()
    held = toy_pair.heldout
    known_NS = topic_known_NS(read_column_NS(held, "pos"), read_column_NS(held, "sent_pos"))
    probe = topic_probe(model, read_column_NS(held), read_column_NS(held, "topic"),
                        layer=model.config.num_hidden_layers // 2, mask_NS=known_NS)
    print(f"\n{name}: topic probe at layer {probe.layer}: {probe.accuracy:.2f} "
          f"(chance {probe.chance:.2f})")
    assert probe.accuracy > probe.chance + 0.2


def test_cache_is_reused(toy_pair: ToyPaths) -> None:
    stamp = toy_pair.report.stat().st_mtime_ns
    again = ensure_toy_pair(preset("test"), root=toy_pair.dir.parent)
    assert not again.built and again.dir == toy_pair.dir
    assert toy_pair.report.stat().st_mtime_ns == stamp
    assert toy_pair.dir.name == config_key(preset("test"))
    leftovers = [p for p in toy_pair.dir.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers  # the temporary build directory was renamed away


def test_config_validation_and_keys() -> None:
    with pytest.raises(ConfigError):
        LanguageConfig(n_topics=1)
    with pytest.raises(ConfigError):
        LanguageConfig(p_paren=0.9)
    with pytest.raises(ConfigError):
        ToyModelConfig(hidden_size=30, n_heads=4)
    with pytest.raises(ConfigError):
        ToyPairConfig(seq_len=4)
    with pytest.raises(ConfigError):
        preset("nope")
    assert config_key(preset("test")) == config_key(preset("test"))
    assert config_key(preset("test")) != config_key(preset("default"))
