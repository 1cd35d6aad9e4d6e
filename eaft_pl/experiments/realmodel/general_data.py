"""The data of the general suites for the real-model experiment, written for this package: world facts
with same-category distractors, requests for the instruction-following suite, and general prompts
for the agreement suite.

Facts mix easy items (the capital of France) with harder ones whose obvious lure is wrong (the
capital of Australia next to Sydney, Wuthering Heights next to Charlotte Bronte), so a small model
neither fails nor aces the suite and a fine-tune's loss can show.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

__all__ = ["Fact", "FACTS", "CATEGORY_ANSWERS", "REQUESTS", "TOPICS", "GENERAL_PROMPTS", "CONSTRAINT_VALUES"]


class Fact(NamedTuple):
    """One question, its answer, its category (distractors are other answers of the category) and
    lures: wrong answers that a shallow association suggests, always offered as distractors."""

    category: str
    question: str
    answer: str
    lures: Tuple[str, ...] = ()


def _rows(category: str, template: str, rows: List[Tuple]) -> List[Fact]:
    return [Fact(category, template.format(row[0]), row[1], tuple(row[2:])) for row in rows]


FACTS: List[Fact] = [
    *_rows("city", "What is the capital of {}?", [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Greece", "Athens"),
        ("Norway", "Oslo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Poland", "Warsaw"),
        ("Australia", "Canberra", "Sydney", "Melbourne"), ("Canada", "Ottawa", "Toronto", "Vancouver"),
        ("Brazil", "Brasilia", "Rio de Janeiro", "Sao Paulo"), ("Turkey", "Ankara", "Istanbul"),
        ("Switzerland", "Bern", "Zurich", "Geneva"), ("Nigeria", "Abuja", "Lagos"), ("Pakistan", "Islamabad", "Karachi"),
        ("New Zealand", "Wellington", "Auckland"), ("Morocco", "Rabat", "Casablanca"), ("Vietnam", "Hanoi", "Ho Chi Minh City"),
        ("Kazakhstan", "Astana", "Almaty"), ("India", "New Delhi", "Mumbai"),
    ]),
    *_rows("author", "Who wrote {}?", [
        ("Romeo and Juliet", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"), ("War and Peace", "Leo Tolstoy"),
        ("Don Quixote", "Miguel de Cervantes"), ("Moby-Dick", "Herman Melville"), ("Oliver Twist", "Charles Dickens"),
        ("Frankenstein", "Mary Shelley"), ("The Great Gatsby", "F. Scott Fitzgerald"), ("Les Miserables", "Victor Hugo"),
        ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Divine Comedy", "Dante Alighieri"), ("Ulysses", "James Joyce", "Homer"),
        ("Wuthering Heights", "Emily Bronte", "Charlotte Bronte"), ("Madame Bovary", "Gustave Flaubert"),
        ("The Canterbury Tales", "Geoffrey Chaucer"), ("Dracula", "Bram Stoker"), ("Brave New World", "Aldous Huxley", "George Orwell"),
        ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"), ("Faust", "Johann Wolfgang von Goethe"),
    ]),
    *_rows("element symbol", "What is the chemical symbol of {}?", [
        ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"), ("helium", "He"), ("iron", "Fe", "Ir"), ("gold", "Au", "Go", "Ag"),
        ("silver", "Ag", "Si"), ("sodium", "Na", "So"), ("potassium", "K", "P", "Po"), ("lead", "Pb", "Le"),
        ("copper", "Cu", "Co"), ("mercury", "Hg", "Me"), ("tin", "Sn", "Ti"), ("tungsten", "W", "Tu"), ("zinc", "Zn"),
    ]),
    *_rows("language", "What is the main language spoken in {}?", [
        ("Germany", "German"), ("Japan", "Japanese"), ("Italy", "Italian"), ("Brazil", "Portuguese", "Spanish"),
        ("Mexico", "Spanish"), ("Iran", "Persian", "Arabic"), ("Austria", "German", "Austrian"), ("Israel", "Hebrew"),
        ("the Netherlands", "Dutch"), ("Argentina", "Spanish", "Portuguese"), ("Ethiopia", "Amharic"),
        ("Mozambique", "Portuguese", "Swahili"), ("Finland", "Finnish", "Swedish"), ("Hungary", "Hungarian"),
    ]),
    *_rows("continent", "On which continent is {}?", [
        ("Kenya", "Africa"), ("Peru", "South America"), ("Thailand", "Asia"), ("Norway", "Europe"),
        ("Canada", "North America"), ("Fiji", "Oceania"), ("Mongolia", "Asia"), ("Uruguay", "South America"),
        ("Madagascar", "Africa", "Asia"), ("Iceland", "Europe", "North America"), ("Cuba", "North America", "South America"),
        ("Papua New Guinea", "Oceania", "Africa"),
    ]),
    *_rows("painter", "Who painted {}?", [
        ("the Mona Lisa", "Leonardo da Vinci"), ("The Starry Night", "Vincent van Gogh"), ("Guernica", "Pablo Picasso"),
        ("The Persistence of Memory", "Salvador Dali"), ("The Birth of Venus", "Sandro Botticelli"),
        ("The Night Watch", "Rembrandt"), ("Girl with a Pearl Earring", "Johannes Vermeer", "Rembrandt"),
        ("The Scream", "Edvard Munch"), ("Las Meninas", "Diego Velazquez", "Francisco Goya"),
        ("American Gothic", "Grant Wood"), ("The Garden of Earthly Delights", "Hieronymus Bosch"),
    ]),
    *_rows("planet", "Which planet {}?", [
        ("is known as the Red Planet", "Mars"), ("is the largest in the Solar System", "Jupiter"),
        ("is closest to the Sun", "Mercury"), ("is the hottest in the Solar System", "Venus", "Mercury"),
        ("has the moon Titan", "Saturn"), ("has the moons Phobos and Deimos", "Mars"), ("has the moon Triton", "Neptune"),
        ("has its axis tilted so far that it rotates on its side", "Uranus"), ("is the farthest from the Sun", "Neptune", "Pluto"),
    ]),
]

#: Every answer of each category: the pool distractors are drawn from.
CATEGORY_ANSWERS: Dict[str, List[str]] = {}
for _fact in FACTS:
    _pool = CATEGORY_ANSWERS.setdefault(_fact.category, [])
    if _fact.answer not in _pool:
        _pool.append(_fact.answer)
CATEGORY_ANSWERS["continent"] = ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
CATEGORY_ANSWERS["planet"] = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]

#: Requests of the instruction-following suite (``{}``: a topic).
REQUESTS: List[str] = ["Describe {}.", "Write a short note about {}.", "Tell me something about {}."]
TOPICS: List[str] = [
    "the sea", "autumn", "a bicycle", "coffee", "the moon", "a library", "rain", "mountains",
    "a city park", "bread", "music", "trains", "winter", "a garden", "the desert", "friendship",
]

#: Values each constraint kind draws from (kinds without a value map to ``[None]``).
CONSTRAINT_VALUES: Dict[str, List] = {
    "lowercase": [None],
    "max_words": [10, 15, 20],
    "min_words": [15, 20],
    "keyword": ["river", "lantern", "purple", "window", "honest"],
    "json_keys": [("topic", "summary"), ("title", "description")],
    "ends_with": ["Thank you", "The end", "That is all"],
    "starts_with": ["Today", "Yes", "Well"],
    "bullets": [2, 3],
    "no_commas": [None],
}

#: General requests whose greedy answers the agreement suite records on the base.
GENERAL_PROMPTS: List[str] = [
    "Give me one tip for sleeping better.",
    "What is photosynthesis?",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "What is a good way to learn a new language?",
    "Explain what a computer does.",
    "Why do we have seasons?",
    "Suggest a name for a pet cat.",
    "What is the difference between weather and climate?",
    "How can I save money on groceries?",
    "What does a doctor do?",
    "Why is exercise good for you?",
]
