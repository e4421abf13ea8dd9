"""RULER-style retrieval tasks generated from corpus text with a seed.

Four task families (after RULER, Hsieh et al. 2024), each a haystack of real prose with needles
inserted at seeded depths, a question, an answer prefix the model continues, and exact answers:

  single_needle    one "special magic number for KEY" needle; ask for it
  multi_key        the same, plus distractor needles under other keys
  multi_value      one key, several values; ask for all of them
  variable_track   "VAR A = 12345", "VAR B = VAR A", ...; ask which variables hold the value

`level` sets how hard a family is (distractors, values, hops), so the benchmark can keep the forms
the model solves densely. Values are numbers that never occur in the haystack and keys are unique,
so every answer is unambiguous; `Task.check()` verifies that and the tests call it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

FAMILIES = ("single_needle", "multi_key", "multi_value", "variable_track")
KEY_WORDS = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
             "kestrel", "lantern", "maple", "nectar", "orchid", "pepper", "quartz", "raven", "saffron",
             "tundra", "umber", "violet", "willow", "yarrow", "zephyr")
VAR_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class Task:
    family: str
    level: int
    seed: int
    context: str            # haystack with needles, the document the question is about
    question: str
    answer_prefix: str      # the assistant turn starts with this; the model continues it
    answers: tuple[str, ...]
    needles: tuple[str, ...] = field(default=())
    decoys: tuple[str, ...] = field(default=())  # values/names of distractor needles

    @property
    def user_message(self) -> str:
        return f"{self.context}\n\n{self.question}"

    @property
    def messages(self) -> list[dict]:
        """The chat as the server gets it: the user's question, then the answer prefix the model continues."""
        return [{"role": "user", "content": self.user_message}, {"role": "assistant", "content": self.answer_prefix}]

    def prompt(self, tokenizer) -> str:
        """The text the server prefills for `messages` (SGLang's continue_final_message)."""
        return tokenizer.apply_chat_template(self.messages, tokenize=False, continue_final_message=True)

    def score(self, output: str) -> float:
        """Share of the expected answers present in the output (RULER's string match), and 0 when
        the output names a distractor: listing every number seen is not retrieval."""
        if any(_has(output, d) for d in self.decoys):
            return 0.0
        return sum(_has(output, a) for a in self.answers) / len(self.answers)

    def check(self) -> None:
        """Raise if the task is malformed: a needle missing from the context, or an answer that
        also occurs outside its needles (which would make it ambiguous)."""
        for n in self.needles:
            if self.context.count(n) != 1:
                raise ValueError(f"needle {n!r} occurs {self.context.count(n)} times in the context")
        stripped = self.context
        for n in self.needles:
            stripped = stripped.replace(n, "")
        for a in self.answers + self.decoys:
            if _has(stripped, a) or _has(self.question, a) and a in self.decoys:
                raise ValueError(f"answer or distractor {a!r} occurs outside the needles")


def _has(text: str, word: str) -> bool:
    """`word` occurs in `text` as a whole token (123 is not found in 41234)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def sentences(text: str) -> list[str]:
    """Corpus prose split into sentences (whitespace normalised)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if len(s) > 1]


def _number(rng: random.Random, taken: set[str], digits: int = 6) -> str:
    while True:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in taken:
            taken.add(v)
            return v


def _interleave(rng: random.Random, a: list[str], b: list[str]) -> list[str]:
    """A random merge of two chains that keeps each chain's order."""
    slots = rng.sample(range(len(a) + len(b)), k=len(a))
    it_a, it_b = iter(a), iter(b)
    return [next(it_a) if i in slots else next(it_b) for i in range(len(a) + len(b))]


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _needles(family: str, level: int, rng: random.Random, taken: set[str]):
    """(needle sentences, question, answer prefix, answers, decoys) for one task."""
    keys = rng.sample(KEY_WORDS, k=min(len(KEY_WORDS), 2 + level * 2))
    key = keys[0]
    if family in ("single_needle", "multi_key"):
        n_keys = 1 if family == "single_needle" else 1 + 2 * level
        vals = [_number(rng, taken) for _ in range(n_keys)]
        needles = [f"The special magic number for {k} is: {v}." for k, v in zip(keys[:n_keys], vals)]
        rng.shuffle(needles)  # the asked key is not always the first needle
        return (needles, f"What is the special magic number for {key} mentioned in the provided text?",
                f"The special magic number for {key} mentioned in the provided text is", [vals[0]], vals[1:])
    if family == "multi_value":
        vals = [_number(rng, taken) for _ in range(1 + level)]
        needles = [f"One of the special magic numbers for {key} is: {v}." for v in vals]
        return (needles, f"What are all the special magic numbers for {key} mentioned in the provided text?",
                f"The special magic numbers for {key} mentioned in the provided text are", vals, [])
    if family == "variable_track":
        names = rng.sample([a + b + c for a in VAR_LETTERS for b in VAR_LETTERS for c in VAR_LETTERS],
                           k=2 * (level + 1))
        chain, other = names[: level + 1], names[level + 1:]
        value, decoy = _number(rng, taken, 5), _number(rng, taken, 5)
        needles = _interleave(rng, _chain(chain, value), _chain(other, decoy))
        return (needles, f"Find all variables that are assigned the value {value} in the text above.",
                f"Answer: the variables assigned the value {value} are: VAR", chain, other)
    raise ValueError(f"unknown task family {family!r}; choose from {FAMILIES}")


def make_task(family: str, level: int, pieces: list[str], count_tokens: Callable[[str], int],
              context_tokens: int, seed: int) -> Task:
    """A task whose user message is about `context_tokens` tokens: haystack sentences from a
    seeded offset in `pieces`, needles at seeded depths (ordered chains stay ordered)."""
    rng = random.Random(f"{family}/{level}/{context_tokens}/{seed}")
    taken: set[str] = set()
    needles, question, prefix, answers, decoys = _needles(family, level, rng, taken)
    room = context_tokens - count_tokens(" ".join(needles) + "\n\n" + question)
    start = rng.randrange(len(pieces))
    hay, used, i = [], 0, start
    while used < room:
        s = pieces[i % len(pieces)]
        used += count_tokens(s) + 1
        hay.append(s)
        i += 1
    while used > room and len(hay) > 1:  # trim back under the target
        used -= count_tokens(hay.pop()) + 1
    hay = [s for s in hay if not any(a in s for a in answers + decoys)]  # never a stray copy
    depths = sorted(rng.randrange(len(hay) + 1) for _ in needles)
    for off, (d, n) in enumerate(zip(depths, needles)):  # sorted depths keep chains in order
        hay.insert(d + off, n)
    task = Task(family, level, seed, " ".join(hay), question, prefix, tuple(answers), tuple(needles), tuple(decoys))
    task.check()
    return task
