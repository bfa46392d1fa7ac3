"""The toy language: a seeded synthetic language whose latent structure is known token by token.

Sentences come from a few templates (transitive, attractor, ioi, greater, induction) filled with
topic words (nouns, verbs and adjectives of one of several topics), names and numbers. A noun
phrase may carry a bracketed clause, nested up to `max_depth`. Every token is labelled with its
sentence's topic, its part of speech, grammatical number, bracket depth, template and slot, so
probes and feature classes have ground truth. The templates also give the contrastive tasks
(prompt, correct word, wrong word, and a counterfactual prompt of the same length on which the
wrong word is the answer), and `Language.rewrite` swaps a sentence's topic words for
another topic's while keeping everything else, which separates structural from semantic features.

Everything is a pure function of `LanguageConfig` and the `random.Random` passed in.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import NamedTuple

from raysae.config import ConfigError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS


class Pos(IntEnum):
    """Part of speech of a token (NONE for special tokens)."""

    NONE = 0
    DET = 1
    NOUN = 2
    VERB = 3
    ADJ = 4
    NAME = 5
    NUM = 6
    PREP = 7
    CONJ = 8
    PRON = 9
    FUNC = 10  # topic-free verbs fixed by a template ("went", "gave")
    PUNCT = 11
    OPEN = 12
    CLOSE = 13


class Number(IntEnum):
    """Grammatical number; names count as singular because they take singular verbs."""

    NONE = 0
    SING = 1
    PLUR = 2


class Slot(IntEnum):
    """Role of a token in its sentence's template; a noun phrase's tokens share its slot."""

    NONE = 0  # special tokens
    FRAME = 1  # literal words and punctuation of the template
    SUBJ = 2
    VERB = 3
    OBJ = 4
    ATTR = 5  # the noun between subject and verb in "attractor"
    PLACE = 6
    NAME_A = 7
    NAME_B = 8
    NAME_S = 9  # the repeated name, subject of the second IOI clause
    NAME_IO = 10  # the indirect object, the IOI answer
    NUM_FROM = 11
    NUM_TO = 12
    PAREN = 13  # anything inside brackets, brackets included


# Upper-case items are slots to fill, everything else is a literal frame word.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "transitive": ("SUBJ", "VERB", "OBJ", "."),
    "attractor": ("SUBJ", "near", "ATTR", "VERB", "OBJ", "."),
    "ioi": ("when", "NAME_A", "and", "NAME_B", "went", "to", "PLACE", ",",
            "NAME_S", "gave", "it", "to", "NAME_IO", "."),
    "greater": ("SUBJ", "VERB", "from", "NUM_FROM", "to", "NUM_TO", "."),
    "induction": ("NAME_A", "NAME_B", "VERB", "OBJ", ",", "then", "NAME_A", "NAME_B", "VERB",
                  "OBJ", "."),
}
TEMPLATE_NAMES = tuple(TEMPLATES)
FRAME_POS = {
    "the": Pos.DET, "near": Pos.PREP, "to": Pos.PREP, "from": Pos.PREP, "when": Pos.CONJ,
    "and": Pos.CONJ, "then": Pos.CONJ, "it": Pos.PRON, "went": Pos.FUNC, "gave": Pos.FUNC,
    ",": Pos.PUNCT, ".": Pos.PUNCT, "(": Pos.OPEN, ")": Pos.CLOSE,
}
TASKS = ("sva", "ioi", "greater_than", "induction", "brackets")
_NOUN_PHRASE_SLOTS = ("SUBJ", "ATTR", "OBJ", "PLACE")


@dataclass(frozen=True)
class LanguageConfig:
    """The toy language's generator settings; the language is a pure function of them."""

    seed: int = 0
    """Seed of the lexicon (which pseudo-words exist) and of the sampled text."""
    n_topics: int = 5
    """Number of topics; each has its own nouns, verbs and adjectives."""
    nouns_per_topic: int = 8
    """Noun stems per topic (each has a singular and a plural form)."""
    verbs_per_topic: int = 6
    """Verb stems per topic (each has a singular and a plural form)."""
    adjectives_per_topic: int = 5
    """Adjectives per topic."""
    n_names: int = 10
    """Person names, shared by all topics (IOI and induction)."""
    n_numbers: int = 40
    """Number words "10", "11", ... for the greater-than pattern."""
    max_depth: int = 2
    """Deepest bracket nesting."""
    p_paren: float = 0.2
    """Chance that a noun phrase carries a bracketed clause (below max_depth)."""
    p_adjective: float = 0.4
    """Chance that a noun phrase has an adjective."""
    p_plural: float = 0.5
    """Chance that a noun phrase is plural."""
    p_keep_topic: float = 0.8
    """Chance that a sentence keeps the previous sentence's topic within a sequence."""
    cast_size: int = 4
    """Names one sequence draws its people from; recurring names make copying from context pay."""
    template_weights: tuple[float, ...] = (1.0, 1.0, 2.0, 1.0, 1.5)
    """Relative frequency of each template, in the order of TEMPLATES (IOI is learnt last)."""

    def __post_init__(self) -> None:
        for name in ("n_topics", "nouns_per_topic", "verbs_per_topic", "adjectives_per_topic"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected >= 1")
        if self.n_topics < 2:
            raise ConfigError(f"n_topics: got {self.n_topics}, expected >= 2 (rewrites need two)")
        n_words = self.n_topics * (self.nouns_per_topic + self.verbs_per_topic
                                   + self.adjectives_per_topic) + self.n_names
        if n_words > 4000:  # the pool of two-syllable pseudo-words holds 4225
            raise ConfigError(f"the lexicon needs {n_words} pseudo-words, more than 4000")
        if self.n_names < 4:
            raise ConfigError(f"n_names: got {self.n_names}, expected >= 4")
        if not 2 <= self.cast_size <= self.n_names:
            raise ConfigError(f"cast_size: got {self.cast_size}, expected 2..n_names")
        if not 4 <= self.n_numbers <= 90:
            raise ConfigError(f"n_numbers: got {self.n_numbers}, expected 4..90")
        if not 0 <= self.max_depth <= 5:
            raise ConfigError(f"max_depth: got {self.max_depth}, expected 0..5")
        for name in ("p_paren", "p_adjective", "p_plural", "p_keep_topic"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a probability")
        if len(self.template_weights) != len(TEMPLATES) or min(self.template_weights) < 0 \
                or sum(self.template_weights) <= 0:
            raise ConfigError(f"template_weights: got {self.template_weights}, expected "
                              f"{len(TEMPLATES)} non-negative weights ({', '.join(TEMPLATES)})")
        if self.p_paren > 0.45:  # a bracket opens two noun phrases: keep the expected size finite
            raise ConfigError(f"p_paren: got {self.p_paren}, expected <= 0.45")


@dataclass(frozen=True)
class Sentence:
    """One sentence: its words and, position by position, their labels."""

    words: tuple[str, ...]
    topic: int
    template: int
    pos: tuple[int, ...]
    number: tuple[int, ...]
    depth: tuple[int, ...]
    slot: tuple[int, ...]


class TaskExample(NamedTuple):
    """A contrastive example: the model should rank `correct` above `wrong` after `prompt`.

    `counter_prompt` is the counterfactual for attribution patching: as long as `prompt` and
    different from it only where the task's answer is decided, so that after it `wrong` is the
    answer (sva, ioi, induction) or at least no less plausible (greater_than, brackets).
    """

    prompt: tuple[str, ...]
    correct: str
    wrong: str
    counter_prompt: tuple[str, ...]


class WordInfo(NamedTuple):
    """What the lexicon knows about a word."""

    pos: Pos
    number: Number
    topic: int  # -1 for topic-free words
    index: int  # stem index within (topic, pos); forms of one stem share it


class _Builder:
    """Accumulates a sentence's words and labels."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.labels: list[tuple[int, int, int, int]] = []  # pos, number, depth, slot

    def add(self, word: str, pos: Pos, number: Number, depth: int, slot: Slot) -> None:
        self.words.append(word)
        self.labels.append((int(pos), int(number), depth, int(slot)))

    def build(self, topic: int, template: int) -> Sentence:
        pos, number, depth, slot = (tuple(c) for c in zip(*self.labels))
        return Sentence(tuple(self.words), topic, template, pos, number, depth, slot)


def _pseudo_words(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    """`n` distinct two-syllable words (consonant-vowel pairs, so none ends in "s")."""
    syllables = [c + v for c in "bdfgklmnprtvz" for v in "aeiou"]
    pool = [a + b for a, b in itertools.product(syllables, syllables) if a + b not in exclude]
    return rng.sample(pool, n)


class Language:
    """The lexicon of a `LanguageConfig` and the samplers of its sentences and tasks."""

    def __init__(self, cfg: LanguageConfig) -> None:
        self.cfg = cfg
        k = cfg.n_topics
        n_stems = k * (cfg.nouns_per_topic + cfg.verbs_per_topic + cfg.adjectives_per_topic)
        stems = iter(_pseudo_words(random.Random(f"{cfg.seed}:lexicon"), n_stems + cfg.n_names,
                                   exclude=set(FRAME_POS)))
        # nouns[t][i] = (singular, plural); verbs[t][i] = (singular, plural), as in English
        self.nouns = [[(s, s + "s") for s in itertools.islice(stems, cfg.nouns_per_topic)]
                      for _ in range(k)]
        self.verbs = [[(s + "s", s) for s in itertools.islice(stems, cfg.verbs_per_topic)]
                      for _ in range(k)]
        self.adjectives = [list(itertools.islice(stems, cfg.adjectives_per_topic))
                           for _ in range(k)]
        self.names = [s.capitalize() for s in stems]
        self.numbers = [str(10 + i) for i in range(cfg.n_numbers)]
        self.info: dict[str, WordInfo] = {}
        for t in range(k):
            for i, forms in enumerate(self.nouns[t]):
                for num, w in zip((Number.SING, Number.PLUR), forms):
                    self.info[w] = WordInfo(Pos.NOUN, num, t, i)
            for i, forms in enumerate(self.verbs[t]):
                for num, w in zip((Number.SING, Number.PLUR), forms):
                    self.info[w] = WordInfo(Pos.VERB, num, t, i)
            for i, w in enumerate(self.adjectives[t]):
                self.info[w] = WordInfo(Pos.ADJ, Number.NONE, t, i)
        for i, w in enumerate(self.names):
            self.info[w] = WordInfo(Pos.NAME, Number.SING, -1, i)
        for i, w in enumerate(self.numbers):
            self.info[w] = WordInfo(Pos.NUM, Number.NONE, -1, i)
        for w, pos in FRAME_POS.items():
            self.info[w] = WordInfo(pos, Number.NONE, -1, 0)
        self.vocab: tuple[str, ...] = SPECIAL_TOKENS + tuple(self.info)

    # -- sentences ------------------------------------------------------------------------------

    def sentence(self, rng: random.Random, topic: int, template: str | None = None,
                 cast: list[str] | None = None) -> Sentence:
        """Sample a sentence of `topic` from `template` (random if None), names from `cast`."""
        name = template or rng.choices(TEMPLATE_NAMES, self.cfg.template_weights)[0]
        b = _Builder()
        np_number = {s: self._number(rng) for s in _NOUN_PHRASE_SLOTS}
        name_a, name_b = rng.sample(cast or self.names, 2)
        name_s = rng.choice((name_a, name_b))
        fixed = {"NAME_A": name_a, "NAME_B": name_b, "NAME_S": name_s,
                 "NAME_IO": name_b if name_s == name_a else name_a}
        n_from = rng.randrange(len(self.numbers) - 1)
        n_to = rng.randrange(n_from + 1, len(self.numbers))
        fixed |= {"NUM_FROM": self.numbers[n_from], "NUM_TO": self.numbers[n_to]}
        verb_number = Number.SING if name == "induction" else np_number["SUBJ"]
        for item in TEMPLATES[name]:
            if item in _NOUN_PHRASE_SLOTS:
                self._noun_phrase(b, rng, topic, np_number[item], 0, Slot[item])
            elif item == "VERB":
                verb = rng.choice(self.verbs[topic])[verb_number == Number.PLUR]
                b.add(verb, Pos.VERB, verb_number, 0, Slot.VERB)
            elif item in fixed:
                pos = Pos.NAME if item.startswith("NAME") else Pos.NUM
                number = Number.SING if pos == Pos.NAME else Number.NONE
                b.add(fixed[item], pos, number, 0, Slot[item])
            else:
                b.add(item, FRAME_POS[item], Number.NONE, 0, Slot.FRAME)
        return b.build(topic, TEMPLATE_NAMES.index(name))

    def _number(self, rng: random.Random) -> Number:
        return Number.PLUR if rng.random() < self.cfg.p_plural else Number.SING

    def _noun_phrase(self, b: _Builder, rng: random.Random, topic: int, number: Number,
                     depth: int, slot: Slot) -> None:
        """`the [adj] noun [( the [adj] noun verb the [adj] noun )]`, brackets nesting."""
        b.add("the", Pos.DET, Number.NONE, depth, slot)
        if rng.random() < self.cfg.p_adjective:
            b.add(rng.choice(self.adjectives[topic]), Pos.ADJ, Number.NONE, depth, slot)
        b.add(rng.choice(self.nouns[topic])[number == Number.PLUR], Pos.NOUN, number, depth, slot)
        if depth < self.cfg.max_depth and rng.random() < self.cfg.p_paren:
            # brackets carry the depth of their inside, so depth rises at "(" and falls after ")"
            inner = depth + 1
            b.add("(", Pos.OPEN, Number.NONE, inner, Slot.PAREN)
            inner_number = self._number(rng)
            self._noun_phrase(b, rng, topic, inner_number, inner, Slot.PAREN)
            verb = rng.choice(self.verbs[topic])[inner_number == Number.PLUR]
            b.add(verb, Pos.VERB, inner_number, inner, Slot.PAREN)
            self._noun_phrase(b, rng, topic, self._number(rng), inner, Slot.PAREN)
            b.add(")", Pos.CLOSE, Number.NONE, inner, Slot.PAREN)

    def sequence(self, rng: random.Random, n_words: int) -> list[Sentence]:
        """Sentences (>= `n_words` words) with one cast of names and a sticky chain of topics."""
        sentences: list[Sentence] = []
        topic = rng.randrange(self.cfg.n_topics)
        cast = rng.sample(self.names, self.cfg.cast_size)
        while sum(len(s.words) for s in sentences) < n_words:
            if sentences and rng.random() >= self.cfg.p_keep_topic:
                topic = rng.choice([t for t in range(self.cfg.n_topics) if t != topic])
            sentences.append(self.sentence(rng, topic, cast=cast))
        return sentences

    # -- content rewrites -----------------------------------------------------------------------

    def rewrite(self, sentence: Sentence, topic: int, rng: random.Random) -> Sentence:
        """The same sentence with every topic word replaced by a word of `topic`.

        Template, slots, parts of speech, numbers, depths, names, numbers and frame words are kept;
        a repeated stem maps to one new stem, so repetitions (induction) survive the rewrite.
        """
        stem_map: dict[tuple[Pos, int], int] = {}
        words = []
        for w in sentence.words:
            info = self.info[w]
            if info.topic < 0:
                words.append(w)
                continue
            lexicon = {Pos.NOUN: self.nouns, Pos.VERB: self.verbs,
                       Pos.ADJ: self.adjectives}[info.pos]
            key = (info.pos, info.index)
            if key not in stem_map:
                stem_map[key] = rng.randrange(len(lexicon[topic]))
            new = lexicon[topic][stem_map[key]]
            words.append(new if info.pos == Pos.ADJ else new[info.number == Number.PLUR])
        return replace(sentence, words=tuple(words), topic=topic)

    def rewrite_sequence(self, sentences: list[Sentence], rng: random.Random) -> list[Sentence]:
        """Rewrite every sentence, moving each topic to another one (a topic derangement)."""
        k = self.cfg.n_topics
        shift = rng.randrange(1, k)  # a cyclic shift never maps a topic to itself
        return [self.rewrite(s, (s.topic + shift) % k, rng) for s in sentences]

    # -- contrastive tasks ----------------------------------------------------------------------

    def task_example(self, task: str, rng: random.Random) -> TaskExample:
        """One contrastive example of `task` (one of TASKS), cut out of a sampled sentence."""
        topic = rng.randrange(self.cfg.n_topics)
        while True:
            template = {"sva": rng.choice(("transitive", "attractor")), "ioi": "ioi",
                        "greater_than": "greater", "induction": "induction",
                        "brackets": None}[task]
            s = self.sentence(rng, topic, template)
            example = self._cut(task, s, rng)
            if example is not None:
                return example

    def _cut(self, task: str, s: Sentence, rng: random.Random) -> TaskExample | None:
        # Counterfactuals are derived from the sentence's labels and draw no randomness, so the
        # clean examples are those of files written before counterfactuals existed.
        w = s.words
        if task == "sva":  # the main verb, against its other number
            i = next(i for i, sl in enumerate(s.slot) if sl == Slot.VERB)
            info = self.info[w[i]]
            other_form = self.verbs[info.topic][info.index][info.number == Number.SING]
            # the subject phrase opens the sentence, so the first noun is the subject's head
            j = s.pos.index(Pos.NOUN)
            noun = self.info[w[j]]
            other_noun = self.nouns[noun.topic][noun.index][noun.number == Number.SING]
            return TaskExample(w[:i], w[i], other_form, _swap(w[:i], {j: other_noun}))
        if task == "ioi":  # the indirect object, against the repeated subject name
            i = s.slot.index(Slot.NAME_IO)
            j = s.slot.index(Slot.NAME_S)  # the second clause's subject becomes the old IO
            return TaskExample(w[:i], w[i], w[j], _swap(w[:i], {j: w[i]}))
        if task == "greater_than":  # the second number, against one below the first
            i = s.slot.index(Slot.NUM_TO)
            lo = self.numbers.index(w[i - 2])
            if lo == 0:
                return None
            # the smallest start makes every number plausible, as Hanna et al.'s year "01"
            counter = _swap(w[:i], {s.slot.index(Slot.NUM_FROM): self.numbers[0]})
            return TaskExample(w[:i], w[i], self.numbers[rng.randrange(lo)], counter)
        if task == "induction":  # the second mention of the name pair's second name
            i = len(s.slot) - 1 - s.slot[::-1].index(Slot.NAME_B)
            others = [n for n in self.names if n not in (w[i], w[i - 1])]
            wrong = rng.choice(others)
            # the first mention of the answer now names `wrong`, so copying predicts it
            return TaskExample(w[:i], w[i], wrong, _swap(w[:i], {s.slot.index(Slot.NAME_B): wrong}))
        if task == "brackets":  # a closing bracket, against the end of the sentence
            closes = [i for i, p in enumerate(s.pos) if p == Pos.CLOSE]
            if not closes:
                return None
            i = rng.choice(closes)
            open_at: list[int] = []
            for j, p in enumerate(s.pos[:i]):
                if p == Pos.OPEN:
                    open_at.append(j)
                elif p == Pos.CLOSE:
                    open_at.pop()
            # with its open brackets turned into commas the prompt has nothing left to close
            return TaskExample(w[:i], w[i], ".", _swap(w[:i], dict.fromkeys(open_at, ",")))
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _swap(words: tuple[str, ...], at: dict[int, str]) -> tuple[str, ...]:
    """`words` with the word at each position of `at` replaced."""
    return tuple(at.get(k, word) for k, word in enumerate(words))
