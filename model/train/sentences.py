"""The sentence pool that synthetic speech says: thousands of varied English sentences.

A speech interface only learns the words it hears spoken: words never heard in training are
replaced by the LLM's prior, so the transcripts must cover everyday vocabulary, not just the
scene words. Sources, each recorded on its sentence:

    fortunes/<file>  single-sentence fortunes from Debian's `fortunes` and `fortunes-min`
                     (the `off/` directory, marked offensive, is never read)
    scene            template sentences and questions about the synthetic scenes
    question         general questions and instructions, typed to the frozen LLM and spoken

The pool is sorted and deterministic (template families are cut by a fixed-seed sample), and
each sentence's split comes from a hash of its text alone, so adding sentences never moves one
from training to held-out or back.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from xllm.model.train.toy import ToolMissingError, article

FORTUNES = Path("/usr/share/games/fortunes")
HELDOUT_PERCENT = 10  # of each source's sentences, never spoken in training data
WORDS = (4, 20)  # words per fortune sentence, inclusive
SCENE_SENTENCES = 1500  # template sentences kept (a fixed-seed sample of all combinations)
# A capitalised sentence of plain words (apostrophes, inner hyphens), commas only between words,
# one final . ! or ?: no digits, quotes, brackets or abbreviations the engines read differently.
CLEAN = re.compile(r"[A-Z][a-z']*(?:,? [A-Za-z][a-z']*(?:-[a-z']+)*)*[.!?]")


@dataclass(frozen=True)
class Sentence:
    text: str
    source: str  # "fortunes/<file>", "scene" or "question"
    heldout: bool  # True: only held-out evaluation speech says it


def is_heldout(text: str) -> bool:
    digest = hashlib.sha256(text.lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def clean_sentence(fortune: str) -> str | None:
    """A fortune that is one clean sentence of 4-20 words (attribution lines dropped), or None."""
    lines = [line for line in fortune.splitlines() if not line.strip().startswith("--")]
    text = " ".join(" ".join(lines).split())
    words = text.split()
    if not WORDS[0] <= len(words) <= WORDS[1] or not CLEAN.fullmatch(text):
        return None
    if any(len(w) > 1 and w.isupper() for w in words):  # acronyms: spelled out or not, by engine
        return None
    return text


def fortune_sentences(root: Path = FORTUNES) -> list[tuple[str, str]]:
    """(sentence, "fortunes/<file>") from the fortune files directly in root (not `off/`)."""
    files = (
        sorted(p for p in root.glob("*") if p.is_file() and not p.suffix) if root.is_dir() else []
    )
    if not files:
        raise ToolMissingError(
            f"no fortune files in {root}; the sentence pool needs them: "
            "`apt-get install -y fortunes fortunes-min` (Debian/Ubuntu)"
        )
    found = []
    for path in files:
        fortunes = re.split(r"^%$", path.read_text(encoding="latin-1"), flags=re.MULTILINE)
        found += [(s, f"fortunes/{path.name}") for s in map(clean_sentence, fortunes) if s]
    return found


# --- scene sentences ----------------------------------------------------------------------


def scene_sentences() -> list[str]:
    """Every template sentence about the scenes, then a fixed-seed sample of them."""
    from xllm.model.train.scenes import (  # scenes imports this module
        COLORS,
        DIRECTIONS,
        NUMBERS,
        POSITIONS,
        SHAPES,
        plural,
    )

    combos = []
    for color in COLORS:
        for shape in SHAPES:
            a = article(color)
            for where in POSITIONS.values():
                combos += [
                    f"There is {a} {color} {shape} {where}.",
                    f"The {shape} {where} is {color}.",
                ]
                combos += [f"Is the {color} {shape} {where}?"]
            for direction in DIRECTIONS.values():
                combos += [f"The {color} {shape} moves {direction}."]
                combos += [f"{a.capitalize()} {color} {shape} moving {direction}."]
            for size in ("small", "large"):
                combos += [f"I can see {a} {size} {color} {shape}."]
            for number in NUMBERS[1:]:
                combos += [f"There are {number} {color} {plural(shape)}."]
            combos += [f"Where is the {color} {shape}?", f"What color is the {shape}?"]
            combos += [
                f"How many {plural(shape)} are there?",
                f"How many {color} shapes are there?",
            ]
    combos = sorted(set(combos))
    return sorted(random.Random("xllm-sentences/scene").sample(combos, SCENE_SENTENCES))


# --- general questions and instructions ---------------------------------------------------

COUNTRIES = (
    "France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada",
    "Mexico", "Egypt", "Kenya", "Australia", "Russia", "Norway", "Sweden", "Greece", "Turkey",
    "Peru", "Argentina", "Portugal", "Ireland", "Poland", "Thailand", "Vietnam", "Chile",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "horse", "cow", "sheep", "lion", "tiger", "elephant", "giraffe", "zebra",
    "monkey", "rabbit", "mouse", "owl", "eagle", "penguin", "dolphin", "whale", "shark", "frog",
    "snake", "bee", "spider", "duck", "goat", "bear", "wolf", "fox", "camel", "kangaroo",
)  # fmt: skip
THINGS = (
    "a hammer", "a spoon", "a ladder", "a compass", "a map", "a clock", "an umbrella",
    "a telescope", "a bicycle", "a candle", "a pencil", "a key", "a mirror", "a rope",
    "a thermometer", "a kettle", "a needle", "a broom", "a camera", "a battery",
)  # fmt: skip
TOPICS = (
    "the moon", "the ocean", "volcanoes", "rain", "the sun", "winter", "trees", "rivers",
    "mountains", "music", "friendship", "bread", "coffee", "the desert", "birds", "stars",
    "books", "gardens", "snow", "the wind", "electricity", "honey", "clouds", "the forest",
)  # fmt: skip
COLOURED = (
    "the sky", "grass", "snow", "a banana", "a tomato", "coal", "milk", "an orange",
    "a lemon", "blood", "chocolate", "the sea", "a carrot", "an emerald", "a strawberry",
)  # fmt: skip
ADJECTIVES = (
    "hot", "big", "fast", "happy", "old", "light", "early", "strong", "wet", "loud",
    "rich", "hard", "empty", "high", "thick", "sharp", "sweet", "bright", "clean", "near",
)  # fmt: skip
CATEGORIES = (
    "fruits", "vegetables", "colors", "animals", "birds", "trees", "flowers", "planets",
    "musical instruments", "sports", "countries in Europe", "kitchen tools", "rivers",
)  # fmt: skip
SMALL_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PEOPLE = (
    "Albert Einstein", "Isaac Newton", "Marie Curie", "William Shakespeare", "Leonardo da Vinci",
    "Charles Darwin", "Abraham Lincoln", "Napoleon", "Mozart", "Cleopatra", "Galileo",
    "Nelson Mandela", "Jane Austen", "Mahatma Gandhi", "Julius Caesar", "Confucius",
    "Christopher Columbus", "Beethoven", "Pablo Picasso", "Florence Nightingale",
)  # fmt: skip
JOBS = (
    "doctor", "teacher", "farmer", "pilot", "baker", "nurse", "carpenter", "lawyer", "chef",
    "firefighter", "librarian", "plumber", "scientist", "architect", "dentist", "journalist",
    "painter", "soldier", "sailor", "gardener", "engineer", "judge", "mechanic", "musician",
)  # fmt: skip
FOODS = (
    "pancakes", "bread", "soup", "a salad", "rice", "pasta", "an omelette", "tea", "lemonade",
    "pizza", "a sandwich", "cookies", "popcorn", "mashed potatoes", "a smoothie", "jam",
)  # fmt: skip
ACTIVITIES = (
    "walking", "swimming", "reading", "sleeping well", "drinking water", "learning a language",
    "playing chess", "cycling", "gardening", "cooking at home", "meditation", "running",
)  # fmt: skip
PAIRS = (
    ("a frog", "a toad"), ("a lake", "a sea"), ("weather", "climate"), ("a virus", "a bacterium"),
    ("a hill", "a mountain"), ("a star", "a planet"), ("a fruit", "a vegetable"),
    ("a town", "a city"), ("a bee", "a wasp"), ("a crocodile", "an alligator"),
    ("speed", "velocity"), ("a rabbit", "a hare"), ("a poem", "a song"), ("rain", "snow"),
)  # fmt: skip
WORDS_TO_TRANSLATE = (
    "hello", "thank you", "good morning", "water", "friend", "house", "cat", "bread",
    "goodbye", "apple", "book", "love", "sun", "night", "school", "tree",
)  # fmt: skip
LANGUAGES = ("French", "Spanish", "German", "Italian")
QUESTIONS = (
    "Why is the sky blue?", "How far away is the moon?", "What is the boiling point of water?",
    "How many days are in a year?", "What is the largest ocean?", "What is the tallest mountain?",
    "How many continents are there?", "What is the biggest planet?", "Why do leaves fall?",
    "How do birds fly?", "What makes a rainbow?", "Why is the sea salty?", "What is gravity?",
    "How does the heart work?", "What is the speed of light?", "Why do we dream?",
    "How many hours are in a day?", "What is photosynthesis?", "Why do cats purr?",
    "What is the fastest animal?", "How do plants grow?", "What causes thunder?",
    "How many weeks are in a year?", "What is the longest river?", "Why do we need sleep?",
    "What is a black hole?", "How are clouds made?", "What is the smallest country?",
    "Can you tell me a joke?", "What should I cook for dinner?", "How can I sleep better?",
    "What is a good name for a dog?", "How do I tie a tie?", "What day comes after Monday?",
    "What month comes after June?", "Which is heavier, a kilogram of iron or of feathers?",
    "How do I say hello in Japanese?", "What is the weather like in summer?",
    "Who invented the telephone?", "Who painted the Mona Lisa?", "Who wrote Romeo and Juliet?",
    "Who was the first person on the moon?", "What is the capital of the United States?",
)  # fmt: skip


def general_questions() -> list[str]:
    """Questions and instructions a user might type; the frozen LLM's answers become targets."""
    out = []
    for country in COUNTRIES:
        out += [
            f"What is the capital of {country}?",
            f"What language do people speak in {country}?",
        ]
        out += [f"Where is {country}?", f"Tell me something about {country}."]
    for animal in ANIMALS:
        plural_animal = {"mouse": "mice", "sheep": "sheep", "wolf": "wolves", "fox": "foxes"}.get(
            animal, animal + "s"
        )
        a = article(animal)
        out += [f"What do {plural_animal} eat?", f"Where do {plural_animal} live?"]
        out += [f"How many legs does {a} {animal} have?", f"What sound does {a} {animal} make?"]
        out += [f"Is {a} {animal} a mammal?", f"Describe {a} {animal} in one sentence."]
    for thing in THINGS:
        out += [f"What is {thing} used for?", f"How does {thing} work?"]
    for topic in TOPICS:
        out += [f"Write a short poem about {topic}.", f"Tell me a fun fact about {topic}."]
        out += [f"Explain {topic} to a child.", f"Write one sentence about {topic}."]
    for thing in COLOURED:
        out += [f"What color is {thing}?"]
    for adjective in ADJECTIVES:
        out += [f"What is the opposite of {adjective}?", f"Give me a word that means {adjective}."]
    for category in CATEGORIES:
        out += [f"Name three {category}.", f"Can you list some {category}?"]
    for i, a in enumerate(SMALL_NUMBERS):
        for b in SMALL_NUMBERS[i::3]:
            out += [f"What is {a} plus {b}?"]
    for person in PEOPLE:
        out += [f"Who was {person}?", f"What is {person} famous for?"]
    for job in JOBS:
        out += [f"What does {article(job)} {job} do?", f"How do I become {article(job)} {job}?"]
    for food in FOODS:
        out += [f"How do I make {food}?", f"What goes into {food}?"]
    for activity in ACTIVITIES:
        out += [f"What are the benefits of {activity}?", f"How do I get better at {activity}?"]
    for one, other in PAIRS:
        out += [f"What is the difference between {one} and {other}?"]
    for word in WORDS_TO_TRANSLATE:
        out += [f"How do you say {word} in {language}?" for language in LANGUAGES]
    out += QUESTIONS
    return sorted(set(out))


@functools.cache
def sentence_pool(fortunes: Path = FORTUNES) -> tuple[Sentence, ...]:
    """Every sentence with its source and split, sorted by (source, text), duplicates dropped
    (a sentence keeps the first source in that order)."""
    found = fortune_sentences(fortunes)
    found += [(s, "scene") for s in scene_sentences()]
    found += [(s, "question") for s in general_questions()]
    seen: set[str] = set()
    pool = []
    for text, source in sorted(found, key=lambda pair: (pair[1], pair[0])):
        if text not in seen:
            seen.add(text)
            pool.append(Sentence(text, source, is_heldout(text)))
    return tuple(pool)


def sentences(source: str, heldout: bool) -> tuple[Sentence, ...]:
    """The pool's sentences of one split whose source starts with `source` ("fortunes", ...)."""
    return tuple(
        s for s in sentence_pool() if s.heldout == heldout and s.source.split("/")[0] == source
    )
