"""Held-out prompts for speculative decoding's real acceptance (bench_spec.py): chat and code.

Written for this benchmark and used nowhere else (not in the draft's training data, issue 17c), as chat
messages for the default model's template. Code prompts ask for edits of code they quote, where a
prompt lookup finds long runs; chat prompts are free prose, where it finds few.
"""

from __future__ import annotations

CHAT = [
    "What are three good habits for getting better sleep? Explain each briefly.",
    "Explain the difference between weather and climate to a ten-year-old.",
    "Write a short, friendly email inviting my team to a picnic on Friday.",
    "Give me a packing list for a weekend hiking trip in the mountains.",
    "Why do leaves change colour in autumn?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
]

_PY = """def total_price(items):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    return total


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
"""

_JS = """function countWords(text) {
  const counts = {};
  for (const word of text.split(" ")) {
    if (counts[word] === undefined) {
      counts[word] = 0;
    }
    counts[word] = counts[word] + 1;
  }
  return counts;
}
"""

CODE = [
    f"Add type hints and a docstring to each function, and return the whole code:\n\n{_PY}",
    f"Rename `items` to `cart` everywhere in this code and show the result:\n\n{_PY}",
    f"Rewrite this JavaScript with `let` instead of `const`, keeping everything else the same:\n\n{_JS}",
    f"Convert this JavaScript function to Python:\n\n{_JS}",
    "Write a Python function that checks whether a string is a palindrome, with three unit tests.",
    "Write a SQL query that lists each customer's name and their total order amount, highest first.",
]


def prompt_set(kind: str) -> list[str]:
    """`chat`, `code` or `all`: the user messages of that kind."""
    sets = {"chat": CHAT, "code": CODE, "all": CHAT + CODE}
    if kind not in sets:
        raise ValueError(f"unknown prompt set {kind!r}: use chat, code or all")
    return sets[kind]
