"""The training prompts for the shipped draft: several hundred varied requests (chat, code, prose,
lists, rewriting), built from hand-written templates and topics with a fixed seed, so that the draft
sees the kinds of text the default model writes. The benchmark's held-out prompts
(heldout_prompts.json) are kept out: `training_prompts` drops any that collide with them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HELDOUT_FILE = Path(__file__).with_name("heldout_prompts.json")

TOPICS = [
    "photosynthesis",
    "the water cycle",
    "black holes",
    "the French Revolution",
    "volcanoes",
    "machine learning",
    "the immune system",
    "climate change",
    "the stock market",
    "honey bees",
    "the Roman Empire",
    "electric cars",
    "sleep",
    "coffee",
    "the internet",
    "vaccines",
    "earthquakes",
    "the moon",
    "recycling",
    "meditation",
    "compound interest",
    "DNA",
    "the printing press",
    "rainbows",
    "inflation",
    "renewable energy",
    "the human heart",
    "octopuses",
    "jazz music",
    "the Olympic Games",
    "chess",
    "gardening",
    "time zones",
    "antibiotics",
    "the Great Wall of China",
    "solar panels",
    "tides",
    "dinosaurs",
    "cloud computing",
    "nutrition",
    "public speaking",
    "the Amazon rainforest",
    "bread baking",
    "magnets",
    "democracy",
    "volunteering",
    "bicycles",
    "the periodic table",
    "friendship",
    "budgeting",
    "coral reefs",
    "the Renaissance",
    "airplanes",
    "glaciers",
    "language learning",
]
AUDIENCES = ["a five-year-old", "a high school student", "a busy manager", "a beginner", "an expert"]
CHAT_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What is {t}? Explain it to {a}.",
    "Why is {t} important?",
    "Give me three interesting facts about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Summarize what people should know about {t} in one paragraph.",
    "How would you explain {t} to {a}?",
    "What are common misconceptions about {t}?",
    "Write a short quiz with three questions about {t}.",
    "Tell me the history of {t} briefly.",
    "Can you help me understand {t}?",
    "What questions should I ask to learn more about {t}?",
]
LIST_TEMPLATES = [
    "List five tips for {x}.",
    "Give me a numbered list of steps for {x}.",
    "What are seven things to remember when {x}?",
    "Make a checklist for {x}.",
    "List the pros and cons of {x}.",
]
ACTIVITIES = [
    "learning to cook",
    "starting a small business",
    "running a marathon",
    "studying for exams",
    "moving to a new city",
    "writing a resume",
    "saving money",
    "planning a birthday party",
    "training a puppy",
    "staying focused at work",
    "traveling on a budget",
    "starting a vegetable garden",
    "preparing for a job interview",
    "reducing stress",
    "learning to swim",
    "organizing a closet",
    "buying a used car",
    "hosting a dinner",
    "writing a novel",
    "keeping houseplants alive",
    "camping in the mountains",
    "learning a musical instrument",
    "working from home",
    "eating healthier",
]
PROSE_TEMPLATES = [
    "Write a short story about {c} who discovers {o}.",
    "Write a poem about {t}.",
    "Write a haiku about {t}.",
    "Write a friendly email to {p} about {x}.",
    "Write a product description for {o}.",
    "Write a diary entry from the point of view of {c}.",
    "Describe {o} in vivid detail.",
    "Write a limerick about {c}.",
    "Write a motivational message for someone who is {x}.",
    "Write the opening paragraph of a mystery novel set in {s}.",
]
CHARACTERS = [
    "a lonely robot",
    "a curious cat",
    "an old lighthouse keeper",
    "a young wizard",
    "a brave astronaut",
    "a shy dragon",
    "a detective",
    "a talking tree",
    "a retired teacher",
    "a street musician",
    "a pirate captain",
    "a tiny mouse",
    "a time traveler",
    "a baker",
    "a knight",
]
OBJECTS = [
    "a hidden door",
    "a magic map",
    "an ancient coin",
    "a broken watch",
    "a singing bird",
    "a new planet",
    "a secret garden",
    "a mysterious letter",
    "a smart water bottle",
    "noise-cancelling headphones",
    "a handmade wooden chair",
    "a solar lantern",
    "a lost key",
    "a glowing stone",
]
PEOPLE = ["my manager", "a colleague", "my landlord", "a friend", "my neighbor", "a customer", "my team"]
SETTINGS = [
    "a small fishing village",
    "a space station",
    "Victorian London",
    "a desert town",
    "a snowy forest",
]
CODE_TASKS = [
    "reverses a string",
    "checks whether a number is prime",
    "computes the factorial of n",
    "returns the n-th Fibonacci number",
    "counts the vowels in a string",
    "merges two sorted lists",
    "removes duplicates from a list while keeping order",
    "finds the largest element in a list",
    "checks whether a string is a palindrome",
    "flattens a nested list",
    "computes the average of a list",
    "converts Celsius to Fahrenheit",
    "sorts a list of dictionaries by a key",
    "reads a CSV file and sums a column",
    "counts word frequencies in a text",
    "implements binary search",
    "validates an email address with a regex",
    "computes the greatest common divisor of two numbers",
    "transposes a matrix",
    "implements bubble sort",
    "returns the unique characters of a string",
    "checks whether two strings are anagrams",
    "finds the second largest number in a list",
    "groups words by their first letter",
    "computes the sum of digits of an integer",
    "converts a decimal number to binary",
    "implements a stack class with push and pop",
    "implements a queue using two stacks",
    "parses a date string and returns the weekday",
    "finds all prime numbers below n",
    "capitalizes the first letter of every word",
    "rotates a list by k positions",
    "counts the lines in a file",
    "generates a random password",
    "computes the power set of a list",
]
LANGS = ["Python", "Python", "Python", "JavaScript", "Java", "C", "Go", "Rust", "C++", "TypeScript"]
CODE_TEMPLATES = [
    "Write a {l} function that {c}.",
    "How do I write a program in {l} that {c}?",
    "Write a {l} function that {c}, and explain how it works.",
    "Show me {l} code that {c}, with comments.",
    "Write a {l} function that {c}. Include a short test.",
]
CODE_QUESTIONS = [
    "What is the difference between a list and a tuple in Python?",
    "Explain what a closure is in JavaScript.",
    "What does the `yield` keyword do in Python?",
    "How do I read a file line by line in Python?",
    "What is recursion? Give an example.",
    "Explain Big O notation with examples.",
    "What is the difference between git merge and git rebase?",
    "How do I create a virtual environment in Python?",
    "What is a REST API?",
    "Explain the difference between SQL JOIN types.",
    "What is a race condition?",
    "How do Python decorators work?",
    "What is the difference between a process and a thread?",
    "Explain what a hash table is.",
    "How do I handle exceptions in Java?",
    "What is dependency injection?",
    "Explain async and await in JavaScript.",
    "What is the difference between == and is in Python?",
    "How does garbage collection work?",
    "Write a SQL query that returns the ten most recent orders.",
    "Write a bash command that finds all .txt files in a folder.",
    "Explain list comprehensions in Python with examples.",
    "What is a linked list and when should I use one?",
    "How do I sort a dictionary by value in Python?",
]
REWRITE_TEMPLATES = [
    "Rewrite this sentence to sound more formal: '{s}'",
    "Translate to French: '{s}'",
    "Fix the grammar: '{s}'",
    "Make this sentence shorter: '{s}'",
    "Rewrite this in a cheerful tone: '{s}'",
]
SENTENCES = [
    "i cant come to the meeting tomorrow because i am sick",
    "The report is late again and we need it done soon.",
    "we was going to the store but it were closed",
    "Thanks for all your help with the project last week.",
    "The weather today is cold and rainy so stay inside.",
    "Our team finished the work ahead of schedule.",
    "Please send me the files before friday if you can.",
    "I think the new design looks really nice but a bit busy.",
]


def _all_candidates() -> list[str]:
    out: list[str] = []
    for tmpl in CHAT_TEMPLATES:
        for t in TOPICS:
            out.append(tmpl.format(t=t, a=AUDIENCES[len(t) % len(AUDIENCES)]))
    for tmpl in LIST_TEMPLATES:
        out.extend(tmpl.format(x=x) for x in ACTIVITIES)
    for tmpl in PROSE_TEMPLATES:
        for c in CHARACTERS:
            for o in OBJECTS[:6]:
                out.append(
                    tmpl.format(
                        c=c,
                        o=o,
                        t=TOPICS[len(c) % len(TOPICS)],
                        p=PEOPLE[len(o) % len(PEOPLE)],
                        x=ACTIVITIES[len(c + o) % len(ACTIVITIES)],
                        s=SETTINGS[len(o) % len(SETTINGS)],
                    )
                )
    for tmpl in CODE_TEMPLATES:
        for c in CODE_TASKS:
            for lang in LANGS[2:5]:
                out.append(tmpl.format(l=lang, c=c))
    out.extend(CODE_QUESTIONS)
    for tmpl in REWRITE_TEMPLATES:
        out.extend(tmpl.format(s=s) for s in SENTENCES)
    return out


def heldout_prompts() -> dict[str, list[str]]:
    """The benchmark's held-out prompts: {"chat": [...], "code": [...]}."""
    return json.loads(HELDOUT_FILE.read_text())


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct training prompts, none of them held out, in a seeded order (code one in three)."""
    held = {p for group in heldout_prompts().values() for p in group}
    pool = sorted({p for p in _all_candidates() if p not in held})
    rng = random.Random(seed)
    code = [p for p in pool if any(w in p for w in ("code", "function", "program", "SQL", "Python", "bash"))]
    other = [p for p in pool if p not in set(code)]
    rng.shuffle(code)
    rng.shuffle(other)
    n_code = min(len(code), count // 3)
    picked = code[:n_code] + other[: count - n_code]
    rng.shuffle(picked)
    return picked
