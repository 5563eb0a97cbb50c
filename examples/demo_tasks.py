"""The tiny task language the demo model learns, shared by make_demo_model.py and make_demo_data.py.

A prompt is one user message "<Task>: w1 w2 ... wn" over a small fixed word list; the answer is
a deterministic function of the words:

    Repeat: red fox sky   ->  red fox sky      (copying)
    Reverse: red fox sky  ->  sky fox red
    First: red fox sky    ->  red
    Last: red fox sky     ->  sky

Copying is what a 2-minute CPU model learns best (induction heads form quickly); the other three
tasks show that it reads the instruction word, not just the list. An optional system prompt is
drawn from SYSTEM_PROMPTS; the model learns to ignore it, and the demo Parquet reuses the first
few so that rows share a long prefix (what the prefix cache is for).

Pure Python, no torch: everything is a function of a `random.Random`, so a seed fixes the data.
"""

from __future__ import annotations

import random

# 64 short, common English words. Each becomes a single BPE token (the tokenizer is trained on
# text made of them); see make_demo_model.build_tokenizer for how spaces are attached.
WORDS = (
    "red blue green black white gold pink gray "
    "cat dog fox owl bee cow pig hen "
    "sun moon star sky rain snow wind fog "
    "tree leaf rose seed root bark moss fern "
    "rock sand lake sea hill cave road city "
    "bread milk tea rice egg salt cake soup "
    "one two three four five six seven ten "
    "book pen door key box cup bell lamp"
).split()

# Task name -> answer function over the word list.
TASKS = {
    "Repeat": lambda words: list(words),
    "Reverse": lambda words: list(reversed(words)),
    "First": lambda words: [words[0]],
    "Last": lambda words: [words[-1]],
}

# Sampling weights: copying and reversing need the most training signal.
TASK_WEIGHTS = {"Repeat": 5, "Reverse": 3, "First": 1, "Last": 1}

MIN_WORDS, MAX_WORDS = 2, 6

# The first three are the ones the demo Parquet uses (long enough to fill at least one
# 16-token KV block, so rows that share one get prefix-cache hits); the rest only add variety
# in training so the model does not depend on the exact system text.
SYSTEM_PROMPTS = (
    "You are a precise assistant for a data pipeline. Follow the instruction exactly and "
    "answer with the words only, nothing else.",
    "You transform short word lists. Read the task name before the colon, apply it to the "
    "words after it, and never add extra words.",
    "You are a terse helper. Keep every answer as short as possible and end it right away.",
    "Be exact.",
    "You are a helpful assistant.",
    "Answer in lower case words separated by single spaces.",
)
DEMO_SYSTEM_PROMPTS = SYSTEM_PROMPTS[:3]


def sample_prompt(rng: random.Random, weights: dict | None = None) -> tuple[str, list[str]]:
    """Draw one (task, words) pair: a weighted task and MIN_WORDS..MAX_WORDS distinct words."""
    weights = weights or TASK_WEIGHTS
    names = list(weights)
    task = rng.choices(names, weights=[weights[n] for n in names])[0]
    num_words = rng.randint(MIN_WORDS, MAX_WORDS)
    # Distinct words: with repeats, "which word comes after this one" has two answers and
    # copying becomes ambiguous.
    words = rng.sample(WORDS, num_words)
    return task, words


def user_text(task: str, words: list[str]) -> str:
    """The user message for a task, e.g. 'Reverse: red fox sky'."""
    return f"{task}: {' '.join(words)}"


def answer_text(task: str, words: list[str]) -> str:
    """The exact expected assistant reply (no trailing space, no punctuation)."""
    return " ".join(TASKS[task](words))


def parse_user_text(text: str) -> tuple[str, list[str]]:
    """Inverse of user_text; raises ValueError for text outside the task language."""
    task, sep, rest = text.partition(": ")
    if not sep or task not in TASKS:
        raise ValueError(f"not a demo prompt: {text!r} (expected '<Task>: w1 w2 ...', "
                         f"Task in {sorted(TASKS)})")
    return task, rest.split(" ")


def sample_messages(rng: random.Random, system_prob: float = 0.7) -> tuple[list[dict], str]:
    """One training/eval conversation: ([system?], user) messages and the expected answer."""
    task, words = sample_prompt(rng)
    messages = []
    if rng.random() < system_prob:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": user_text(task, words)})
    return messages, answer_text(task, words)


def corpus_lines(rng: random.Random, n: int) -> list[str]:
    """Plain text the BPE tokenizer is trained on: every word, system prompt and task name."""
    lines = list(SYSTEM_PROMPTS) + [" ".join(WORDS)] + [f"{t}:" for t in TASKS]
    for _ in range(n):
        task, words = sample_prompt(rng)
        lines.append(user_text(task, words))
        lines.append(answer_text(task, words))
    return lines
