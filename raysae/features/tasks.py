"""Contrastive task sets for attribution patching: clean and counterfactual prompts, tokenised.

A task example is a prompt, a correct and a wrong next token, and a counterfactual prompt of the
same token length after which the wrong token is (or is closer to being) the answer. Attribution
patching (Nanda 2023; Syed et al. 2023) scores a unit by IE ≈ ∇_f m|clean · (f_counter − f_clean)
with m = logit[correct] − logit[wrong] at the last prompt position (`TaskSet.logit_diff_N`).

`load_tasks(source, tokenizer, n_examples)` reads either

- a token-id task file (`.parquet`) with columns `task`, `prompt_ids`, `counter_ids`,
  `correct_id`, `wrong_id` (the toy pair's tasks.parquet; other columns are ignored): one TaskSet
  per task in file order, the first `n_examples` rows of each, ids used as stored (BOS included);
- a template file (`.yaml`/`.yml`), or the name of one shipped in raysae/features/task_templates/
  (`SHIPPED_TEMPLATES`: ioi, greater_than, sva), filled with random slot values and tokenised.

Template file format:

    task: ioi                    # the name the metrics are logged under
    templates:                   # one or more; each a clean and a counterfactual prompt
      - clean: "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
        counterfactual: "When {IO} and {S} went to the {PLACE}, {IO} gave a {OBJECT} to"
        # correct: / wrong: here override the file's answers for this template
    correct: " {IO}"             # the answer after the clean prompt (leading space included)
    wrong: " {S}"                # the contrast answer, the counterfactual's answer
    slots:                       # each slot is one of:
      IO: [Mary, John]           #   a list of strings (or integers)
      S: [Mary, John]
      NOUN: [[key, keys]]        #   a list of equally long lists, read as {NOUN[0]}, {NOUN[1]}
      YY: {range: [2, 98], format: "{:02d}"}   # integers lo..hi inclusive, optional format
    distinct: [[IO, S]]          # optional: slots in one group take different values
    increasing: [[LT, YY, GT]]   # optional: numeric values strictly increasing in this order

Every example draws one template and one value per slot (uniformly among the assignments that
meet `distinct` and `increasing`) with `random.Random(f"{seed}:{task}")`. Placeholders are
substituted with a regex, never `str.format`, so a template cannot reach attributes. A filled
example is kept only if

1. `correct` and `wrong` each encode to exactly one token (`add_special_tokens=False`),
2. the two answer tokens differ,
3. the clean and counterfactual prompts encode to the same number of tokens (positions align).

Rejected examples are redrawn, at most 50 × n_examples draws in all; after that a ValueError
names the file and the check that failed most. With `prepend_bos` the tokenizer's BOS (if it has
one) starts every prompt. Pure torch, pyarrow and yaml: usable without Ray or MLflow.
"""

from __future__ import annotations

import collections
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml

from raysae.config import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "task_templates"
SHIPPED_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml")))
"""Names of the template files shipped with raysae, usable as a task source."""
TASK_FILE_COLUMNS = ("task", "prompt_ids", "counter_ids", "correct_id", "wrong_id")
"""Columns a token-id task file must have."""
ATTEMPTS_PER_EXAMPLE = 50
"""Draws allowed per requested example before a template task gives up."""

_PLACEHOLDER = re.compile(r"\{(\w+)(?:\[(\d+)\])?\}")
_FORMAT = re.compile(r"\{(?::([^{}]*))?\}")  # "{}" or "{:spec}", nothing else
_TEMPLATE_KEYS = {"task", "templates", "correct", "wrong", "slots", "distinct", "increasing"}


def logit_diff(
    logits_BTV: torch.Tensor, lengths_B: torch.Tensor, correct_B: torch.Tensor,
    wrong_B: torch.Tensor,
) -> torch.Tensor:
    """m [B]: logit of the correct minus the wrong answer at each prompt's last position."""
    dev = logits_BTV.device
    rows_B = torch.arange(len(lengths_B), device=dev)
    last_BV = logits_BTV[rows_B, lengths_B.to(dev) - 1].float()
    return last_BV[rows_B, correct_B.to(dev)] - last_BV[rows_B, wrong_B.to(dev)]


@dataclass(frozen=True)
class TaskSet:
    """Tokenised contrastive examples: clean and counterfactual prompts of equal length."""

    name: str
    """The task's name, under which its metrics are logged."""
    clean_NT: torch.Tensor
    """int64 clean prompts, right-padded with `pad_id`."""
    counter_NT: torch.Tensor
    """int64 counterfactual prompts, same shape; row n has the same length as clean row n."""
    lengths_N: torch.Tensor
    """int64 real tokens of row n; the answer is read at position lengths_N - 1."""
    correct_N: torch.Tensor
    """int64 token id the model should predict after the clean prompt."""
    wrong_N: torch.Tensor
    """int64 contrast token id (the counterfactual's answer)."""
    pad_id: int
    """Token id filling the rows beyond their length."""

    def __post_init__(self) -> None:
        where = f"TaskSet {self.name!r}"
        if self.clean_NT.ndim != 2 or self.clean_NT.shape != self.counter_NT.shape:
            raise ValueError(f"{where}: clean {tuple(self.clean_NT.shape)} and counterfactual "
                             f"{tuple(self.counter_NT.shape)} must be equal [N, T] shapes")
        n, t = self.clean_NT.shape
        for field in ("lengths_N", "correct_N", "wrong_N"):
            if getattr(self, field).shape != (n,):
                raise ValueError(f"{where}: {field} has shape {tuple(getattr(self, field).shape)}, "
                                 f"expected ({n},)")
        for field in ("clean_NT", "counter_NT", "lengths_N", "correct_N", "wrong_N"):
            if getattr(self, field).dtype != torch.int64:
                raise ValueError(f"{where}: {field} is {getattr(self, field).dtype}, "
                                 "expected int64")
        if n and not (1 <= int(self.lengths_N.min()) and int(self.lengths_N.max()) <= t):
            raise ValueError(f"{where}: lengths must lie in 1..{t}")
        pad_NT = torch.arange(t, device=self.lengths_N.device) >= self.lengths_N[:, None]
        if not ((self.clean_NT[pad_NT] == self.pad_id).all()
                and (self.counter_NT[pad_NT] == self.pad_id).all()):
            raise ValueError(f"{where}: clean and counterfactual rows must hold pad_id "
                             f"{self.pad_id} beyond their lengths")

    def __len__(self) -> int:
        return len(self.lengths_N)

    def logit_diff_N(self, logits_NTV: torch.Tensor) -> torch.Tensor:
        """m = logit[correct] - logit[wrong] at each row's last real position."""
        return logit_diff(logits_NTV, self.lengths_N, self.correct_N, self.wrong_N)


# -- sources ----------------------------------------------------------------------------------


def _resolve(source: str) -> Path:
    """The file a task source names, or ConfigError saying what was expected."""
    expected = (f"a shipped template name ({', '.join(SHIPPED_TEMPLATES)}), a .yaml/.yml template "
                "file or a .parquet token-id task file")
    path = Path(source)
    if path.suffix in (".parquet", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"task source {source!r}: no such file; expected {expected}")
        return path
    if path.suffix or "/" in source or "\\" in source:
        raise ConfigError(f"task source {source!r}: unsupported file type; expected {expected}")
    if source not in SHIPPED_TEMPLATES:
        raise ConfigError(f"task source {source!r}: unknown task; expected {expected}")
    return TEMPLATE_DIR / f"{source}.yaml"


def check_task_source(source: str) -> None:
    """Cheap validation of a task source before expensive work starts; raises ConfigError."""
    path = _resolve(source)
    if path.suffix == ".parquet":
        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"task file {str(path)!r}: not a readable parquet file ({e})") from e
        missing = [c for c in TASK_FILE_COLUMNS if c not in names]
        if missing:
            raise ConfigError(f"task file {str(path)!r}: missing columns {missing}; expected "
                              f"{', '.join(TASK_FILE_COLUMNS)}")
    else:
        _parse_template(path)


def load_tasks(source: str, tokenizer: Any, n_examples: int, seed: int = 0,
               prepend_bos: bool = True, pad_id: int | None = None) -> list[TaskSet]:
    """The task sets of `source` (see the module docstring), `n_examples` examples each.

    `tokenizer` is a Hugging Face tokenizer (`encode`, `bos_token_id`, `pad_token_id` are used);
    only template tasks need one. Padding is `pad_id`, else the tokenizer's, else 0: rows are
    right-padded, which leaves a causal model's logits at the real positions unchanged.
    """
    check_task_source(source)
    if n_examples < 1:
        raise ConfigError(f"n_examples: got {n_examples}, expected >= 1")
    path = _resolve(source)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
    if path.suffix == ".parquet":
        return _load_task_file(path, n_examples, pad_id)
    if tokenizer is None:
        raise ValueError(f"task source {source!r} is a template task: it needs a tokenizer")
    template = _parse_template(path)
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    return [_sample_task(template, tokenizer, n_examples, seed, bos, pad_id)]


def _load_task_file(path: Path, n_examples: int, pad_id: int) -> list[TaskSet]:
    rows = pq.read_table(path, columns=list(TASK_FILE_COLUMNS)).to_pylist()
    by_task: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for i, row in enumerate(rows):
        mine = by_task.setdefault(row["task"], [])
        if len(mine) < n_examples:
            mine.append((i, row))
    sets = []
    for task, mine in by_task.items():
        for i, row in mine:
            if len(row["counter_ids"]) != len(row["prompt_ids"]):
                raise ValueError(
                    f"task file {str(path)!r}, task {task!r}, row {i}: counter_ids has "
                    f"{len(row['counter_ids'])} tokens, prompt_ids {len(row['prompt_ids'])}")
        sets.append(_task_set(task, [r["prompt_ids"] for _, r in mine],
                              [r["counter_ids"] for _, r in mine],
                              [r["correct_id"] for _, r in mine],
                              [r["wrong_id"] for _, r in mine], pad_id))
    return sets


def _task_set(name: str, clean: list[list[int]], counter: list[list[int]], correct: list[int],
              wrong: list[int], pad_id: int) -> TaskSet:
    lengths_N = torch.tensor([len(r) for r in clean], dtype=torch.int64)
    clean_NT = torch.full((len(clean), int(lengths_N.max())), pad_id, dtype=torch.int64)
    counter_NT = clean_NT.clone()
    for n, (a, b) in enumerate(zip(clean, counter, strict=True)):
        clean_NT[n, : len(a)] = torch.tensor(a)
        counter_NT[n, : len(b)] = torch.tensor(b)
    return TaskSet(name, clean_NT, counter_NT, lengths_N, torch.tensor(correct, dtype=torch.int64),
                   torch.tensor(wrong, dtype=torch.int64), pad_id)


# -- templates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """A parsed template file."""

    path: Path
    task: str
    prompts: tuple[tuple[str, str, str, str], ...]  # clean, counterfactual, correct, wrong
    slots: dict[str, tuple[str | tuple[str, ...], ...]]
    numbers: dict[str, tuple[float, ...]]  # numeric values of the slots that have them
    distinct: tuple[tuple[str, ...], ...]
    increasing: tuple[tuple[str, ...], ...]


def _parse_template(path: Path) -> _Template:
    where = f"task template {str(path)!r}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {type(data).__name__}, expected a mapping with keys "
                          f"{sorted(_TEMPLATE_KEYS)}")
    if unknown := sorted(set(data) - _TEMPLATE_KEYS):
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {sorted(_TEMPLATE_KEYS)}")
    for key in ("task", "templates", "slots"):
        if key not in data:
            raise ConfigError(f"{where}: missing key {key!r}")
    task = data["task"]
    if not isinstance(task, str) or not re.fullmatch(r"[\w.-]+", task):
        raise ConfigError(f"{where}: task: got {task!r}, expected a name (letters, digits, _.-)")
    slots, numbers = _parse_slots(data["slots"], where)
    prompts = []
    if not isinstance(data["templates"], list) or not data["templates"]:
        raise ConfigError(f"{where}: templates: expected a non-empty list of "
                          "{clean, counterfactual[, correct, wrong]} mappings")
    for i, t in enumerate(data["templates"]):
        if not isinstance(t, dict) or not {"clean", "counterfactual"} <= set(t) \
                or set(t) - {"clean", "counterfactual", "correct", "wrong"}:
            raise ConfigError(f"{where}: templates[{i}]: got {t!r}, expected a mapping with "
                              "clean and counterfactual (and optionally correct, wrong)")
        texts = [t["clean"], t["counterfactual"], t.get("correct", data.get("correct")),
                 t.get("wrong", data.get("wrong"))]
        for name, text in zip(("clean", "counterfactual", "correct", "wrong"), texts):
            if not isinstance(text, str):
                raise ConfigError(f"{where}: templates[{i}].{name}: got {text!r}, expected a "
                                  "string (correct and wrong may be given once for the file)")
            _check_placeholders(text, slots, where)
        prompts.append(tuple(texts))
    groups = {}
    for key in ("distinct", "increasing"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
            raise ConfigError(f"{where}: {key}: got {value!r}, expected a list of lists of slots")
        for g in value:
            for s in g:
                if not isinstance(s, str) or s not in slots:
                    raise ConfigError(f"{where}: {key}: unknown slot {s!r}; slots: {sorted(slots)}")
                if key == "increasing" and s not in numbers:
                    raise ConfigError(f"{where}: increasing: slot {s!r} has non-numeric values")
        groups[key] = tuple(tuple(g) for g in value)
    return _Template(path, task, tuple(prompts), slots, numbers, groups["distinct"],
                     groups["increasing"])


def _parse_slots(raw: Any, where: str) -> tuple[dict, dict]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: slots: expected a non-empty mapping of slot names to values")
    slots: dict[str, tuple[str | tuple[str, ...], ...]] = {}
    numbers: dict[str, tuple[float, ...]] = {}
    for name, spec in raw.items():
        at = f"{where}: slots.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"\w+", name):
            raise ConfigError(f"{where}: slot name {name!r}: expected letters, digits or _")
        if isinstance(spec, dict):
            rng, fmt = spec.get("range"), spec.get("format", "{}")
            m = _FORMAT.fullmatch(fmt) if isinstance(fmt, str) else None
            if set(spec) - {"range", "format"} or not (
                    isinstance(rng, list) and len(rng) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                    and rng[0] <= rng[1]) or m is None:
                raise ConfigError(f"{at}: got {spec!r}, expected {{range: [lo, hi], format: "
                                  f"\"{{:02d}}\"}} with integers lo <= hi and an optional format")
            ints = range(rng[0], rng[1] + 1)
            try:
                slots[name] = tuple(format(v, m[1] or "") for v in ints)
            except ValueError as e:
                raise ConfigError(f"{at}: format {fmt!r} does not apply to integers ({e})") from e
            numbers[name] = tuple(float(v) for v in ints)
            continue
        if not isinstance(spec, list) or not spec:
            raise ConfigError(f"{at}: got {spec!r}, expected a non-empty list or a range")
        values: list[str | tuple[str, ...]] = []
        for v in spec:
            items = v if isinstance(v, list) else [v]
            # YAML reads yes/no/on/off as booleans: a name like No must be quoted
            if not items or any(isinstance(x, bool) or not isinstance(x, str | int) for x in items):
                raise ConfigError(f"{at}: value {v!r}: expected a string or integer (quote "
                                  "words YAML reads otherwise) or a list of them")
            values.append(tuple(str(x) for x in items) if isinstance(v, list) else str(v))
        if len({isinstance(v, tuple) for v in values}) > 1 or (
                isinstance(values[0], tuple) and len({len(v) for v in values}) > 1):
            raise ConfigError(f"{at}: mixes strings and lists, or lists of different lengths")
        slots[name] = tuple(values)
        try:
            numbers[name] = tuple(float(v) for v in values)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    return slots, numbers


def _check_placeholders(text: str, slots: dict, where: str) -> None:
    for m in _PLACEHOLDER.finditer(text):
        name, index = m[1], m[2]
        if name not in slots:
            raise ConfigError(f"{where}: placeholder {m[0]!r}: unknown slot; slots: "
                              f"{sorted(slots)}")
        is_tuple = isinstance(slots[name][0], tuple)
        if is_tuple and (index is None or int(index) >= len(slots[name][0])):
            raise ConfigError(f"{where}: placeholder {m[0]!r}: slot {name} holds lists of "
                              f"{len(slots[name][0])}; expected {{{name}[0]}}.."
                              f"{{{name}[{len(slots[name][0]) - 1}]}}")
        if not is_tuple and index is not None:
            raise ConfigError(f"{where}: placeholder {m[0]!r}: slot {name} holds strings; "
                              f"expected {{{name}}}")
    rest = _PLACEHOLDER.sub("", text)
    if "{" in rest or "}" in rest:
        bad = re.search(r"\{[^}]*\}?|\}", rest)
        raise ConfigError(f"{where}: placeholder {bad[0] if bad else rest!r} in {text!r}: "
                          "expected {SLOT} or {SLOT[i]}")


def _fill(text: str, values: dict[str, str | tuple[str, ...]]) -> str:
    def one(m: re.Match) -> str:
        v = values[m[1]]
        return v[int(m[2])] if isinstance(v, tuple) else v

    return _PLACEHOLDER.sub(one, text)


def _draw(t: _Template, rng: random.Random) -> dict[str, int]:
    """Value indices per slot, uniform among the assignments meeting the constraints."""
    for _ in range(10_000):
        pick = {s: rng.randrange(len(v)) for s, v in t.slots.items()}
        if all(len({t.slots[s][pick[s]] for s in g}) == len(g) for g in t.distinct) and all(
                all(t.numbers[a][pick[a]] < t.numbers[b][pick[b]] for a, b in zip(g, g[1:]))
                for g in t.increasing):
            return pick
    raise ConfigError(f"task template {str(t.path)!r}: 10000 draws met no assignment of the "
                      "distinct and increasing constraints")


def _sample_task(t: _Template, tokenizer: Any, n_examples: int, seed: int, bos: int | None,
                 pad_id: int) -> TaskSet:
    rng = random.Random(f"{seed}:{t.task}")
    failed: collections.Counter[str] = collections.Counter()
    clean, counter, correct, wrong = [], [], [], []
    prefix = [] if bos is None else [bos]

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    for _ in range(ATTEMPTS_PER_EXAMPLE * n_examples):
        if len(clean) == n_examples:
            break
        texts = rng.choice(t.prompts)
        pick = _draw(t, rng)
        values = {s: t.slots[s][i] for s, i in pick.items()}
        clean_text, counter_text, correct_text, wrong_text = (_fill(x, values) for x in texts)
        answers = encode(correct_text), encode(wrong_text)
        if len(answers[0]) != 1 or len(answers[1]) != 1:
            failed["an answer is not one token"] += 1
            continue
        if answers[0] == answers[1]:
            failed["correct and wrong are the same token"] += 1
            continue
        ids, counter_ids = encode(clean_text), encode(counter_text)
        if len(ids) != len(counter_ids):
            failed["clean and counterfactual lengths differ"] += 1
            continue
        if not ids and not prefix:
            failed["the prompt is empty"] += 1
            continue
        clean.append(prefix + ids)
        counter.append(prefix + counter_ids)
        correct.append(answers[0][0])
        wrong.append(answers[1][0])
    if len(clean) < n_examples:
        reasons = ", ".join(f"{why} ({k}x)" for why, k in failed.most_common())
        raise ValueError(f"task template {str(t.path)!r} ({t.task}): only {len(clean)} of "
                         f"{n_examples} examples passed the checks in "
                         f"{ATTEMPTS_PER_EXAMPLE * n_examples} draws; failed: {reasons}")
    return _task_set(t.task, clean, counter, correct, wrong, pad_id)
