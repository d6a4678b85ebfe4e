"""A small labelled task for BERT fine-tuning: topic of a sentence about one noun, with held-out nouns.

Every sentence is a category-neutral template around one noun ("i saw a {noun} yesterday.") and its label is the
noun's category: animal, food, vehicle or clothing. The test split uses nouns *and* templates that never occur in
training, so a model can only score above chance (25%) on it by knowing what unseen words mean: a pre-trained
encoder (all-MiniLM-L6-v2) does, the same network trained from scratch on the training sentences does not. The word
lists and templates below were written for ms_llm (no external data).
"""
from __future__ import annotations

from typing import List, Tuple

LABELS = ("animal", "food", "vehicle", "clothing")

TRAIN_WORDS = {
    "animal": ["dog", "cat", "horse", "cow", "sheep", "pig", "goat", "rabbit", "mouse", "rat", "lion", "tiger",
               "bear", "wolf", "fox", "deer", "monkey", "elephant", "giraffe", "zebra", "camel", "donkey",
               "squirrel", "kangaroo", "hippo", "rhino", "leopard", "otter", "beaver", "hamster"],
    "food": ["bread", "cheese", "apple", "banana", "rice", "pasta", "pizza", "soup", "salad", "cake", "cookie",
             "sandwich", "potato", "tomato", "carrot", "orange", "grape", "butter", "egg", "steak", "bacon", "pie",
             "muffin", "pancake", "noodle", "yogurt", "cereal", "burger", "taco", "onion"],
    "vehicle": ["car", "bus", "truck", "train", "bicycle", "motorcycle", "taxi", "van", "tractor", "scooter", "boat",
                "ship", "airplane", "helicopter", "jeep", "ambulance", "tram", "subway", "ferry", "yacht",
                "limousine", "sedan", "minivan", "trailer", "canoe", "kayak", "rocket", "glider", "bulldozer",
                "forklift"],
    "clothing": ["shirt", "jacket", "coat", "dress", "skirt", "sweater", "hat", "cap", "scarf", "glove", "sock",
                 "shoe", "boot", "sandal", "belt", "tie", "hoodie", "vest", "blouse", "jeans", "trousers", "shorts",
                 "pajamas", "uniform", "apron", "raincoat", "mitten", "slipper", "overcoat", "tuxedo"],
}

TEST_WORDS = {
    "animal": ["cheetah", "moose", "badger", "raccoon", "gorilla", "panda", "koala", "buffalo", "antelope",
               "hedgehog", "porcupine", "chimpanzee", "jaguar", "llama", "weasel"],
    "food": ["lasagna", "omelette", "croissant", "pretzel", "waffle", "burrito", "dumpling", "broccoli", "spinach",
             "mango", "peach", "pear", "biscuit", "porridge", "sausage"],
    "vehicle": ["lorry", "wagon", "carriage", "sailboat", "submarine", "motorbike", "pickup", "snowmobile",
                "hovercraft", "jet", "cab", "locomotive", "moped", "zeppelin", "sleigh"],
    "clothing": ["cardigan", "poncho", "kimono", "bikini", "leggings", "gown", "robe", "sneaker", "beanie", "parka",
                 "tunic", "bathrobe", "turtleneck", "windbreaker", "bonnet"],
}

# {a} is "a" or "an" for the noun, {w} the noun
TRAIN_TEMPLATES = [
    "i saw {a} {w} yesterday.",
    "there is {a} {w} in the picture.",
    "she told me about the {w}.",
    "we talked about the {w} for hours.",
    "the {w} was in the photo.",
    "he pointed at the {w}.",
    "my friend mentioned {a} {w}.",
    "look at that {w}!",
    "the word of the day is {w}.",
    "have you ever seen {a} {w} like this?",
    "this {w} is quite new to me.",
    "the story was about {a} {w}.",
]

TEST_TEMPLATES = [
    "i read an article about {a} {w}.",
    "the {w} caught my attention.",
    "they asked me about the {w}.",
    "{a} {w} appeared in my dream.",
    "nobody expected the {w}.",
    "what a strange {w}!",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _examples(words, templates) -> List[Tuple[str, int]]:
    out = []
    for label, name in enumerate(LABELS):
        for w in words[name]:
            for t in templates:
                text = t.format(a=_article(w), w=w)
                out.append((text[0].upper() + text[1:], label))
    return out


def topic_task() -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """(train, test) lists of (sentence, label); 120 x 12 = 1440 training and 60 x 6 = 360 test sentences, in a
    fixed order (shuffle by seed when batching)."""
    overlap = {w for ws in TRAIN_WORDS.values() for w in ws} & {w for ws in TEST_WORDS.values() for w in ws}
    if overlap:
        raise ValueError(f"train and test nouns overlap: {sorted(overlap)}")
    return _examples(TRAIN_WORDS, TRAIN_TEMPLATES), _examples(TEST_WORDS, TEST_TEMPLATES)
