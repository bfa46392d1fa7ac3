"""Contrastive task sets: toy counterfactuals, the task file, template filling and its checks."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from tokenizers.trainers import BpeTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from raysae.config import ConfigError
from raysae.features.tasks import (
    SHIPPED_TEMPLATES,
    TEMPLATE_DIR,
    TaskSet,
    check_task_source,
    load_tasks,
)
from raysae.toy import TASKS, Language, Pos, ToyPaths, preset

SPECIALS = ["<pad>", "<bos>", "<unk>"]


def _template_words(extra: tuple[str, ...] = ()) -> list[str]:
    """Texts holding every literal and slot value of the shipped templates, and `extra`."""
    texts = list(extra) + [f" {n:02d}" for n in range(100)]
    for name in SHIPPED_TEMPLATES:
        data = yaml.safe_load((TEMPLATE_DIR / f"{name}.yaml").read_text())
        for t in [*data["templates"], data]:
            texts += [re.sub(r"\{[^}]*\}", " ", t[k])
                      for k in ("clean", "counterfactual", "correct", "wrong") if k in t]
        for values in data["slots"].values():
            if isinstance(values, list):
                texts += [" " + " ".join(map(str, v if isinstance(v, list) else [v]))
                          for v in values]
    return texts


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE (like GPT-2's) trained on the templates' words, so each is one token."""
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=4000, min_frequency=1, special_tokens=SPECIALS,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_template_words() * 3, trainer)
    return _wrap(tok)


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that reads "1732" as "17" "32", as GPT-2 reads years."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
    ])
    pieces = {p for text in _template_words() for p, _ in pre.pre_tokenize_str(text)}
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(pieces))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return _wrap(tok)


def _diff(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return torch.nonzero(a != b).flatten().tolist()


# -- toy counterfactuals ------------------------------------------------------------------------


def _open_brackets(pos: list[int]) -> list[int]:
    stack: list[int] = []
    for i, p in enumerate(pos):
        if p == Pos.OPEN:
            stack.append(i)
        elif p == Pos.CLOSE:
            stack.pop()
    return stack


@pytest.mark.parametrize("task", TASKS)
def test_toy_counterfactuals_differ_where_the_answer_is_decided(task: str) -> None:
    lang = Language(preset("test").language)
    rng = random.Random(0)
    for _ in range(100):
        ex = lang.task_example(task, rng)
        p, c = ex.prompt, ex.counter_prompt
        assert len(c) == len(p) and ex.correct != ex.wrong
        diff = [i for i in range(len(p)) if p[i] != c[i]]
        pos = [lang.info[w].pos for w in p]
        if task == "brackets":
            assert diff == _open_brackets(pos) and diff  # every still open "(", nothing else
            assert all(c[i] == "," for i in diff) and not _open_brackets(
                [lang.info[w].pos for w in c])
            continue
        assert len(diff) == 1
        (i,) = diff
        if task == "sva":  # the subject's head noun, turned into its other number
            assert i == pos.index(Pos.NOUN)
            a, b = lang.info[p[i]], lang.info[c[i]]
            assert (a.pos, a.topic, a.index) == (b.pos, b.topic, b.index) and a.number != b.number
            verb = lang.info[ex.correct]
            assert verb.number == a.number and lang.info[ex.wrong].number == b.number
        elif task == "ioi":  # "..., S gave it to": S becomes the indirect object
            assert p[i + 1 :] == ("gave", "it", "to") and (p[i], c[i]) == (ex.wrong, ex.correct)
        elif task == "greater_than":  # "from X to": X becomes the smallest number
            assert p[i - 1] == "from" and c[i] == lang.numbers[0] != p[i]
        else:  # induction: the first mention of the answer now names `wrong`
            assert (i, p[i], c[i]) == (1, ex.correct, ex.wrong) and p[-1] == p[0]


def test_toy_task_file_round_trips(toy_pair: ToyPaths) -> None:
    rows = pq.read_table(toy_pair.tasks).to_pylist()
    sets = load_tasks(str(toy_pair.tasks), None, n_examples=10, pad_id=7)
    assert [s.name for s in sets] == list(TASKS)
    for ts in sets:
        mine = [r for r in rows if r["task"] == ts.name][:10]
        assert len(ts) == 10 and ts.pad_id == 7
        for n, r in enumerate(mine):
            length = len(r["prompt_ids"])
            assert int(ts.lengths_N[n]) == length == len(r["counter_ids"])
            assert ts.clean_NT[n, :length].tolist() == r["prompt_ids"]
            assert ts.counter_NT[n, :length].tolist() == r["counter_ids"]
            assert (ts.clean_NT[n, length:] == 7).all() and (ts.counter_NT[n, length:] == 7).all()
            assert (int(ts.correct_N[n]), int(ts.wrong_N[n])) == (r["correct_id"], r["wrong_id"])
        assert ts.clean_NT.shape[1] == int(ts.lengths_N.max())
    # the tokenizer's pad id is the default, and n_examples beyond the file takes every row
    tok = AutoTokenizer.from_pretrained(toy_pair.tokenizer)
    (ioi,) = [s for s in load_tasks(str(toy_pair.tasks), tok, 10_000) if s.name == "ioi"]
    assert ioi.pad_id == tok.pad_token_id and len(ioi) == sum(r["task"] == "ioi" for r in rows)


def test_toy_model_answer_flips_on_counterfactuals(toy_pair: ToyPaths,
                                                  one_thread: None) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy_pair.small).eval()
    lines = []
    for ts in load_tasks(str(toy_pair.tasks), None, n_examples=64, pad_id=0):
        with torch.no_grad():
            clean_N = ts.logit_diff_N(model(input_ids=ts.clean_NT).logits)
            counter_N = ts.logit_diff_N(model(input_ids=ts.counter_NT).logits)
        lines.append(f"{ts.name}: clean {clean_N.mean():+.2f} counter {counter_N.mean():+.2f}")
        assert clean_N.mean() > 1.0, lines[-1]
        assert counter_N.mean() < clean_N.mean() - 1.0, lines[-1]
        if ts.name in ("sva", "ioi", "induction", "brackets"):  # the answer itself flips
            assert counter_N.mean() < 0, lines[-1]
    print("\n" + "\n".join(lines))


# -- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["bpe", "words"])
@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_shipped_templates_fill_and_differ_in_one_token(task: str, tok_name: str,
                                                        request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(tok_name)
    (ts,) = load_tasks(task, tok, n_examples=100, seed=1)
    assert ts.name == task and len(ts) == 100
    assert (ts.clean_NT[:, 0] == tok.bos_token_id).all()
    assert (ts.correct_N != ts.wrong_N).all()
    for n in range(len(ts)):
        (i,) = _diff(ts.clean_NT[n], ts.counter_NT[n])
        clean, counter = tok.decode(ts.clean_NT[n, i]), tok.decode(ts.counter_NT[n, i])
        if task == "ioi":  # S2 becomes IO: the clean token there is the wrong answer (S)
            assert ts.clean_NT[n, i] == ts.wrong_N[n] and ts.counter_NT[n, i] == ts.correct_N[n]
            row = ts.clean_NT[n, : int(ts.lengths_N[n])].tolist()
            assert row.count(int(ts.correct_N[n])) == 1 and row.count(int(ts.wrong_N[n])) == 2
        else:  # the subject noun changes number; the verb follows it
            singular, plural = sorted((clean.strip(), counter.strip()), key=len)
            assert plural == singular + "s"
            verbs = ("are", "were") if clean.strip() == plural else ("is", "was")
            assert tok.decode(ts.correct_N[n]).strip() in verbs
    again, other = load_tasks(task, tok, 100, seed=1)[0], load_tasks(task, tok, 100, seed=2)[0]
    assert torch.equal(again.clean_NT, ts.clean_NT) and not torch.equal(other.clean_NT, ts.clean_NT)


def test_greater_than_respects_increasing(words: PreTrainedTokenizerFast) -> None:
    (ts,) = load_tasks("greater_than", words, n_examples=100, prepend_bos=False)
    assert ts.clean_NT[0, 0] != words.bos_token_id
    for n in range(len(ts)):
        (i,) = _diff(ts.clean_NT[n], ts.counter_NT[n])  # "17 32" -> "17 01"
        last = int(ts.lengths_N[n]) - 1
        start = int(words.decode(ts.clean_NT[n, i]))
        assert words.decode(ts.counter_NT[n, i]) == "01"
        assert ts.clean_NT[n, i - 1] == ts.clean_NT[n, last]  # the same century twice
        assert int(words.decode(ts.wrong_N[n])) < start < int(words.decode(ts.correct_N[n]))


def _write(tmp_path: Path, data: dict, name: str = "t.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


IOI_LIKE = {
    "task": "mini_ioi",
    "templates": [{"clean": "When {IO} and {S} went to the store, {S} gave a ring to",
                   "counterfactual": "When {IO} and {S} went to the store, {IO} gave a ring to"}],
    "correct": " {IO}", "wrong": " {S}", "distinct": [["IO", "S"]],
}


def test_multi_token_answers_and_length_mismatches_are_filtered(
        tmp_path: Path, bpe: PreTrainedTokenizerFast, words: PreTrainedTokenizerFast) -> None:
    # "Bartholomew" is not among the BPE's training words, so it takes several tokens
    assert len(bpe.encode(" Bartholomew", add_special_tokens=False)) > 1
    source = _write(tmp_path, IOI_LIKE | {"slots": {"IO": ["Mary", "John", "Bartholomew"],
                                                    "S": ["Mary", "John", "Bartholomew"]}})
    (ts,) = load_tasks(source, bpe, n_examples=50)
    answers = {bpe.decode(t) for t in torch.cat([ts.correct_N, ts.wrong_N]).tolist()}
    assert answers == {" Mary", " John"} and ts.name == "mini_ioi"
    only_long = _write(tmp_path, IOI_LIKE | {"slots": {"IO": ["Bartholomew", "Maximilian"],
                                                       "S": ["Bartholomew", "Maximilian"]}})
    with pytest.raises(ValueError, match=r"t\.yaml.*0 of 5.*not one token"):
        load_tasks(only_long, bpe, n_examples=5)
    # a plural of two words makes the counterfactual one token longer than the clean prompt
    sva = {"task": "mini_sva", "correct": " is", "wrong": " are",
           "templates": [{"clean": "The {N[0]} near the wall",
                          "counterfactual": "The {N[1]} near the wall"}]}
    mixed = _write(tmp_path, sva | {"slots": {"N": [["dog", "dogs"], ["dog", "big dogs"]]}})
    (ts,) = load_tasks(mixed, words, n_examples=20)
    assert (ts.lengths_N == ts.lengths_N[0]).all()
    assert ((ts.clean_NT != ts.counter_NT).sum(1) == 1).all()
    bad = _write(tmp_path, sva | {"slots": {"N": [["dog", "big dogs"]]}}, "bad.yaml")
    with pytest.raises(ValueError, match=r"bad\.yaml.*lengths differ"):
        load_tasks(bad, words, n_examples=3)
    # two words the tokenizer does not know are both <unk>
    same = _write(tmp_path, sva | {"correct": " qqq", "wrong": " zzz",
                                   "slots": {"N": [["dog", "dogs"]]}}, "same.yaml")
    with pytest.raises(ValueError, match=r"same\.yaml.*same token"):
        load_tasks(same, words, n_examples=3)


def test_distinct_and_tuple_slots(tmp_path: Path, words: PreTrainedTokenizerFast) -> None:
    data = {"task": "pairs", "correct": " {A}", "wrong": " {B}",
            "templates": [{"clean": "{P[0]} {A} {B} {P[1]}",
                           "counterfactual": "{P[1]} {A} {B} {P[0]}"}],
            "slots": {"A": (names := ["Mary", "John", "Tom"]), "B": names,
                      "P": [["the", "a"], ["near", "to"]]},
            "distinct": [["A", "B"]]}
    (ts,) = load_tasks(_write(tmp_path, data), words, n_examples=60)
    assert (ts.correct_N != ts.wrong_N).all()
    seen = {tuple(words.decode(ts.clean_NT[n, 1:]).split()) for n in range(len(ts))}
    assert {(p, q) for p, _, _, q in seen} == {("the", "a"), ("near", "to")}
    assert len({(a, b) for _, a, b, _ in seen}) == 6  # every ordered pair of distinct values


def test_bad_sources_name_the_value(tmp_path: Path, toy_pair: ToyPaths,
                                    words: PreTrainedTokenizerFast) -> None:
    for source, expected in [("nope", "'nope'.*ioi"), (str(tmp_path / "gone.yaml"), "gone.yaml"),
                             ("tasks.txt", "tasks.txt.*unsupported")]:
        with pytest.raises(ConfigError, match=expected):
            check_task_source(source)
        with pytest.raises(ConfigError, match=expected):
            load_tasks(source, words, 4)
    slots = {"IO": ["Mary", "John"], "S": ["Mary", "John"]}
    for text, expected in [("{NAME} gave", r"'\{NAME\}'.*unknown slot"),
                           ("{IO[1]} gave", r"'\{IO\[1\]\}'.*holds strings"),
                           ("{IO.__class__} gave", r"placeholder '\{IO.__class__\}'")]:
        data = IOI_LIKE | {"slots": slots, "templates": [{"clean": text, "counterfactual": text}]}
        with pytest.raises(ConfigError, match=r"t\.yaml.*" + expected):
            check_task_source(_write(tmp_path, data))
    tuples = IOI_LIKE | {"slots": {"IO": [["a", "b"]], "S": ["x"]}}
    with pytest.raises(ConfigError, match=r"'\{IO\}'.*\{IO\[0\]\}"):
        check_task_source(_write(tmp_path, tuples))
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*YAML"):
        check_task_source(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="YY.*non-numeric"):
        check_task_source(_write(tmp_path, IOI_LIKE | {"slots": slots | {"YY": ["a", "b"]},
                                                       "increasing": [["YY", "IO"]]}))
    with pytest.raises(ValueError, match="'ioi'.*needs a tokenizer"):
        load_tasks("ioi", None, 4)
    # a task file whose counterfactual is one token short in one row
    table = pq.read_table(toy_pair.tasks)
    rows = table.to_pylist()
    k = next(i for i, r in enumerate(rows) if r["task"] == "greater_than") + 2
    rows[k]["counter_ids"] = rows[k]["counter_ids"][:-1]
    bad = tmp_path / "bad_tasks.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad)
    with pytest.raises(ValueError, match=rf"bad_tasks.parquet.*'greater_than'.*row {k}"):
        load_tasks(str(bad), None, 100)
    pq.write_table(table.drop_columns(["counter_ids"]), tmp_path / "old.parquet")
    with pytest.raises(ConfigError, match=r"old.parquet.*counter_ids"):
        check_task_source(str(tmp_path / "old.parquet"))


def test_task_set_checks_and_logit_diff() -> None:
    clean_NT = torch.tensor([[5, 6, 7], [5, 8, 0]])
    counter_NT = torch.tensor([[5, 9, 7], [5, 3, 0]])
    ts = TaskSet("t", clean_NT, counter_NT, torch.tensor([3, 2]), torch.tensor([1, 2]),
                 torch.tensor([3, 4]), pad_id=0)
    logits_NTV = torch.randn(2, 3, 10)
    expected_N = torch.stack([logits_NTV[0, 2, 1] - logits_NTV[0, 2, 3],
                              logits_NTV[1, 1, 2] - logits_NTV[1, 1, 4]])
    assert torch.equal(ts.logit_diff_N(logits_NTV), expected_N) and len(ts) == 2
    with pytest.raises(ValueError, match="pad_id"):
        TaskSet("t", clean_NT, counter_NT.clone().index_put_((torch.tensor([1]), torch.tensor([2])),
                                                             torch.tensor(4)),
                torch.tensor([3, 2]), torch.tensor([1, 2]), torch.tensor([3, 4]), pad_id=0)
    with pytest.raises(ValueError, match="shape"):
        TaskSet("t", clean_NT, counter_NT[:, :2], torch.tensor([3, 2]), torch.tensor([1, 2]),
                torch.tensor([3, 4]), pad_id=0)
    with pytest.raises(ValueError, match="lengths"):
        TaskSet("t", clean_NT, counter_NT, torch.tensor([0, 2]), torch.tensor([1, 2]),
                torch.tensor([3, 4]), pad_id=0)
