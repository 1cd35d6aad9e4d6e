"""Grade-school math word problems with worked answers in a teacher's voice.

Every problem comes from one of the template families of :data:`FAMILIES` (quantities, rates, money,
time; two to four steps), filled with a random person, objects, units and small integers. The
arithmetic of every step is done here, by :class:`Step`, never written out by hand, and the answer is
the last step's value. The teacher's answer (:func:`teacher_answer`) numbers its steps, writes each as
``<what>: a op b = c`` with ``×`` and ``÷`` and ends on a bold ``**Answer:** N`` line: the kind of
answer a large chat model writes, and not the ``#### N`` answers that small models trained on GSM8K
write.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from eaft_pl.experiments.realmodel.splits import disjoint_splits, pick

__all__ = ["FAMILIES", "MathProblem", "Step", "TEACHER_STYLE", "generate", "math_splits", "teacher_answer"]

#: A regular expression of the teacher's style: the answer ends on its ``**Answer:** N`` line.
TEACHER_STYLE = r"\*\*Answer:\*\* -?\d+$"
_OPENING = "Let's solve this step by step."


def _divide(left: int, right: int) -> int:
    if right == 0 or left % right:
        raise ValueError(f"{left} ÷ {right} is not a whole number")
    return left // right


_OPS: Dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "÷": _divide,
}


@dataclass(frozen=True)
class Step:
    """One line of a worked answer: ``what`` is ``left op right``.

    Attributes:
        what: What the step finds, e.g. ``"pencils in the packs"``.
        left: The left operand.
        op: ``+``, ``-``, ``×`` or ``÷`` (whole division only).
        right: The right operand.
        unit: ``"$"`` (written before the value) or a word written after it, or ``""``.
    """

    what: str
    left: int
    op: str
    right: int
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"unknown operation {self.op!r}; use one of {list(_OPS)}")
        if self.value < 0:
            raise ValueError(f"{self.left} {self.op} {self.right} is negative")

    @property
    def value(self) -> int:
        """The step's result."""
        return _OPS[self.op](self.left, self.right)

    def render(self, index: int) -> str:
        """``Step <index>: <What>: a op b = <value>.``"""
        what = self.what[:1].upper() + self.what[1:]
        return f"Step {index}: {what}: {self.left} {self.op} {self.right} = {with_unit(self.value, self.unit)}."


def with_unit(value: int, unit: str) -> str:
    """``$12``, ``12 pencils`` or ``12``."""
    return f"${value}" if unit == "$" else f"{value} {unit}" if unit else str(value)


@dataclass(frozen=True)
class MathProblem:
    """A word problem, its worked steps and its answer (the last step's value).

    Attributes:
        family: The template family it was drawn from (a key of :data:`FAMILIES`).
        question: The problem as the user asks it.
        steps: The worked solution, in order.
    """

    family: str
    question: str
    steps: Tuple[Step, ...]

    @property
    def answer(self) -> int:
        """The exact answer."""
        return self.steps[-1].value

    @property
    def key(self) -> Tuple[str, Tuple[Tuple[int, str, int], ...]]:
        """What makes two problems the same: the family and its arithmetic (names and wording aside), so
        a held-out problem never repeats a training problem's calculation."""
        return self.family, tuple((s.left, s.op, s.right) for s in self.steps)


def teacher_answer(problem: MathProblem) -> str:
    """The teacher's worked answer: an opening line, numbered steps, and the bold answer line."""
    lines = [_OPENING, *(step.render(i) for i, step in enumerate(problem.steps, 1)), f"**Answer:** {problem.answer}"]
    return "\n".join(lines)


# ---- vocabulary ------------------------------------------------------------------------------------

_PEOPLE = (
    ("Maya", "she", "her"), ("Liam", "he", "his"), ("Sofia", "she", "her"), ("Noah", "he", "his"),
    ("Aisha", "she", "her"), ("Mateo", "he", "his"), ("Chen", "he", "his"), ("Priya", "she", "her"),
    ("Olga", "she", "her"), ("Kwame", "he", "his"), ("Lucia", "she", "her"), ("Tom", "he", "his"),
    ("Hana", "she", "her"), ("Diego", "he", "his"), ("Fatima", "she", "her"), ("Ivan", "he", "his"),
    ("Grace", "she", "her"), ("Omar", "he", "his"), ("Yuki", "she", "her"), ("Ben", "he", "his"),
    ("Elena", "she", "her"), ("Samir", "he", "his"), ("Nora", "she", "her"), ("Felix", "he", "his"),
    ("Zara", "she", "her"), ("Arjun", "he", "his"), ("Mia", "she", "her"), ("Lucas", "he", "his"),
)
_COLLECTIBLES = ("stickers", "pencils", "marbles", "stamps", "crayons", "beads", "trading cards", "seashells", "buttons", "postcards")
_SHOP_ITEMS = (("notebooks", "notebook"), ("pens", "pen"), ("sandwiches", "sandwich"), ("T-shirts", "T-shirt"), ("mugs", "mug"), ("candles", "candle"), ("plants", "plant"), ("books", "book"))
_BIG_ITEMS = ("backpack", "lunch box", "calculator", "umbrella", "water bottle", "board game", "scarf", "desk lamp")
_BAKED = ("cookies", "muffins", "cupcakes", "brownies", "rolls", "pancakes")
_VEHICLES = ("train", "car", "bus", "truck", "boat", "motorbike")
_DISTANCE_UNITS = ("kilometers", "miles")
_ACTIVITIES = ("piano", "the guitar", "football", "chess", "swimming", "drawing", "yoga", "the violin")
_CROPS = (("tomato plants", "tomatoes"), ("apple trees", "apples"), ("pepper plants", "peppers"), ("strawberry plants", "strawberries"), ("bean plants", "beans"))
_INGREDIENTS = (("cups of flour", "cups"), ("eggs", "eggs"), ("spoons of sugar", "spoons"), ("cups of milk", "cups"), ("grams of butter", "grams"))
_DISHES = ("pancakes", "muffins", "cookies", "waffles", "scones")
_EVENTS = ("the zoo", "the museum", "the science fair", "the aquarium", "a concert", "the theme park")
_FRIENDS = ("a friend", "a classmate", "a neighbor", "a cousin", "a teammate")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _person(rng: random.Random) -> Tuple[str, str, str]:
    return pick(rng, _PEOPLE)


def _two_people(rng: random.Random) -> Tuple[Tuple[str, str, str], Tuple[str, str, str]]:
    first = _person(rng)
    second = _person(rng)
    while second == first:
        second = _person(rng)
    return first, second


class _Work:
    """Collects a problem's steps while its template computes them."""

    def __init__(self) -> None:
        self.steps: List[Step] = []

    def __call__(self, what: str, left: int, op: str, right: int, unit: str = "") -> int:
        step = Step(what, left, op, right, unit)
        self.steps.append(step)
        return step.value


# ---- the template families -------------------------------------------------------------------------
# Each draws its numbers so that every step is a whole, non-negative number and the answer stays
# below 1000, then writes the question in one of a few phrasings.


def _packs(rng: random.Random, w: _Work) -> str:
    (name, she, her), thing = _person(rng), pick(rng, _COLLECTIBLES)
    have, packs, per, given = rng.randint(5, 30), rng.randint(2, 6), rng.randint(3, 12), rng.randint(2, 9)
    bought = w(f"{thing} in the packs", packs, "×", per, thing)
    total = w(f"{thing} before giving any away", have, "+", bought, thing)
    w(f"{thing} left", total, "-", given, thing)
    ask = pick(rng, (f"How many {thing} does {name} have now?", f"How many {thing} does {name} have left?"))
    return f"{name} has {have} {thing}. {she.capitalize()} buys {packs} packs of {per} {thing} and then gives {given} {thing} to {pick(rng, _FRIENDS)}. {ask}"


def _shopping(rng: random.Random, w: _Work) -> str:
    (name, she, her), (items, _), big = _person(rng), pick(rng, _SHOP_ITEMS), pick(rng, _BIG_ITEMS)
    count, price, big_price = rng.randint(2, 6), rng.randint(2, 12), rng.randint(5, 30)
    bill = next(b for b in (20, 50, 100, 200) if b > count * price + big_price)
    cost = w(f"cost of the {items}", count, "×", price, "$")
    total = w("total cost", cost, "+", big_price, "$")
    w("change", bill, "-", total, "$")
    ask = pick(rng, (f"How much change does {name} get?", f"How many dollars does {name} get back?"))
    return f"{name} buys {count} {items} for ${price} each and {_a(big)} for ${big_price}. {she.capitalize()} pays with a ${bill} bill. {ask}"


def _buses(rng: random.Random, w: _Work) -> str:
    classes, size, seats = rng.randint(3, 8), rng.randint(18, 30), pick(rng, (10, 12, 15, 20, 25))
    absent = (classes * size) % seats or seats  # so that the others fill the buses exactly
    place = pick(rng, _EVENTS)
    students = w("students in the school", classes, "×", size, "students")
    going = w("students on the trip", students, "-", absent, "students")
    w("buses needed", going, "÷", seats, "buses")
    return (
        f"A school has {classes} classes of {size} students. On the day of the trip to {place}, {absent} students are "
        f"absent. The others go by bus, with {seats} students in each bus and no empty seats. How many buses are needed?"
    )


def _sharing(rng: random.Random, w: _Work) -> str:
    (name, she, her), baked = _person(rng), pick(rng, _BAKED)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    # What the person keeps makes the baked total split into whole trays.
    kept = pick(rng, [k for k in range(1, 13) if any((friends * each + k) % t == 0 for t in range(2, 7))])
    trays = pick(rng, [t for t in range(2, 7) if (friends * each + kept) % t == 0])
    per_tray = (friends * each + kept) // trays
    total = w(f"{baked} baked", trays, "×", per_tray, baked)
    shared = w(f"{baked} to share", total, "-", kept, baked)
    w(f"{baked} for each friend", shared, "÷", friends, baked)
    ask = pick(rng, (f"How many {baked} does each friend get?", f"How many {baked} does each of them receive?"))
    return (
        f"{name} bakes {trays} trays of {per_tray} {baked}. {she.capitalize()} keeps {kept} for {her}self and shares the "
        f"rest equally among {friends} friends. {ask}"
    )


def _speed(rng: random.Random, w: _Work) -> str:
    vehicle, unit = pick(rng, _VEHICLES), pick(rng, _DISTANCE_UNITS)
    v1, h1, v2, h2 = 5 * rng.randint(6, 18), rng.randint(2, 5), 5 * rng.randint(4, 14), rng.randint(1, 4)
    first = w("distance in the first part", v1, "×", h1, unit)
    second = w("distance in the second part", v2, "×", h2, unit)
    w("total distance", first, "+", second, unit)
    ask = pick(rng, ("How far does it travel in total?", f"How many {unit} does it cover altogether?"))
    return f"A {vehicle} travels at {v1} {unit} per hour for {h1} hours, then at {v2} {unit} per hour for {h2} hours. {ask}"


def _reading(rng: random.Random, w: _Work) -> str:
    (name, she, her) = _person(rng)
    per_day, days, extra = rng.randint(8, 30), rng.randint(3, 9), rng.randint(5, 40)
    pages = per_day * days + extra + rng.randint(10, 150)
    weekdays = w("pages read on the school days", per_day, "×", days, "pages")
    read = w("pages read in all", weekdays, "+", extra, "pages")
    w("pages left", pages, "-", read, "pages")
    return (
        f"{name}'s book has {pages} pages. {she.capitalize()} reads {per_day} pages a day for {days} days and then "
        f"{extra} more pages on the weekend. How many pages does {she} still have to read?"
    )


def _practice(rng: random.Random, w: _Work) -> str:
    (name, she, her), activity = _person(rng), pick(rng, _ACTIVITIES)
    minutes, days = pick(rng, (15, 20, 25, 30, 40, 45, 50)), rng.randint(2, 20)
    sunday = 60 - (minutes * days) % 60  # so that the total is whole hours
    weekdays = w("minutes on the other days", minutes, "×", days, "minutes")
    total = w("minutes in all", weekdays, "+", sunday, "minutes")
    w("hours of practice", total, "÷", 60, "hours")
    return (
        f"{name} practises {activity} for {minutes} minutes a day for {days} days, and for {sunday} minutes on Sunday. "
        f"How many hours does {she} practise in total?"
    )


def _wages(rng: random.Random, w: _Work) -> str:
    (name, she, her) = _person(rng)
    monday, tuesday, rate = rng.randint(2, 8), rng.randint(2, 8), rng.randint(8, 25)
    hours = w("hours worked", monday, "+", tuesday, "hours")
    w("pay", hours, "×", rate, "$")
    ask = pick(rng, (f"How much does {name} earn on these two days?", f"How many dollars does {she} make in total?"))
    return f"{name} earns ${rate} an hour. {she.capitalize()} works {monday} hours on Monday and {tuesday} hours on Tuesday. {ask}"


def _sleep(rng: random.Random, w: _Work) -> str:
    (name, she, her) = _person(rng)
    hours, weeks, nap = rng.randint(5, 10), rng.randint(2, 12), rng.randint(1, 3)
    days = w("nights in the weeks", weeks, "×", 7, "nights")
    nights = w("hours of sleep at night", days, "×", hours, "hours")
    naps = w("hours of naps", weeks, "×", nap, "hours")
    w("hours of sleep in all", nights, "+", naps, "hours")
    return (
        f"{name} sleeps {hours} hours every night and takes a {nap}-hour nap once a week. How many hours does {she} "
        f"sleep in {weeks} weeks, naps included?"
    )


def _savings(rng: random.Random, w: _Work) -> str:
    (name, she, her), big = _person(rng), pick(rng, _BIG_ITEMS)
    weekly, weeks, gift = rng.randint(4, 25), rng.randint(3, 12), 5 * rng.randint(2, 10)
    price = rng.randint(10, weekly * weeks + gift - 1)
    saved = w("money saved", weekly, "×", weeks, "$")
    total = w("money after the gift", saved, "+", gift, "$")
    w("money left", total, "-", price, "$")
    return (
        f"{name} saves ${weekly} every week for {weeks} weeks. Then {her} grandmother gives {her} ${gift}. "
        f"{she.capitalize()} spends ${price} on {_a(big)}. How much money does {she} have left?"
    )


def _comparison(rng: random.Random, w: _Work) -> str:
    ((first, _, _), (second, _, _)), thing = _two_people(rng), pick(rng, _COLLECTIBLES)
    third = pick(rng, [p for p in _PEOPLE if p[0] not in (first, second)])[0]
    have, times = rng.randint(3, 20), rng.randint(2, 4)
    fewer = rng.randint(1, have * times - 1)
    second_has = w(f"{second}'s {thing}", have, "×", times, thing)
    third_has = w(f"{third}'s {thing}", second_has, "-", fewer, thing)
    two = w(f"{first}'s and {second}'s {thing} together", have, "+", second_has, thing)
    w(f"{thing} of all three", two, "+", third_has, thing)
    return (
        f"{first} has {have} {thing}. {second} has {times} times as many {thing} as {first}, and {third} has {fewer} fewer "
        f"{thing} than {second}. How many {thing} do the three of them have together?"
    )


def _harvest(rng: random.Random, w: _Work) -> str:
    (name, she, her), (plants, crop) = _person(rng), pick(rng, _CROPS)
    rows, per_row, lost, each = rng.randint(3, 9), rng.randint(4, 12), rng.randint(2, 6), rng.randint(2, 9)
    planted = w(f"{plants} planted", rows, "×", per_row, plants)
    alive = w(f"{plants} left", planted, "-", lost, plants)
    w(f"{crop} picked", alive, "×", each, crop)
    return (
        f"{name} plants {rows} rows of {per_row} {plants}. {lost} of them die in a storm. Each of the others gives "
        f"{each} {crop}. How many {crop} does {name} pick?"
    )


def _recipe(rng: random.Random, w: _Work) -> str:
    (ingredient, unit), dish = pick(rng, _INGREDIENTS), pick(rng, _DISHES)
    amount, serves, batches = rng.randint(2, 9), pick(rng, (4, 6, 8, 10, 12)), rng.randint(2, 8)
    wanted = serves * batches
    times = w("batches needed", wanted, "÷", serves, "batches")
    w(f"{unit} needed", times, "×", amount, unit)
    return f"A recipe uses {amount} {ingredient} to make {serves} {dish}. How many {unit} are needed to make {wanted} {dish}?"


def _tickets(rng: random.Random, w: _Work) -> str:
    place = pick(rng, _EVENTS)
    adult, child, adults, children = rng.randint(8, 30), rng.randint(3, 15), rng.randint(2, 4), rng.randint(1, 6)
    parking = rng.randint(3, 15)
    adult_cost = w("adult tickets", adults, "×", adult, "$")
    child_cost = w("children's tickets", children, "×", child, "$")
    tickets = w("all tickets", adult_cost, "+", child_cost, "$")
    w("the whole trip", tickets, "+", parking, "$")
    return (
        f"Tickets to {place} cost ${adult} for an adult and ${child} for a child. A family of {adults} adults and "
        f"{children} children goes, and parking costs ${parking}. How much does the family pay in total?"
    )


def _ages(rng: random.Random, w: _Work) -> str:
    ((first, _, _), (second, _, _)) = _two_people(rng)
    age, older, years = rng.randint(4, 40), rng.randint(2, 30), rng.randint(2, 15)
    second_now = w(f"{second}'s age now", age, "+", older, "years")
    first_then = w(f"{first}'s age then", age, "+", years, "years")
    second_then = w(f"{second}'s age then", second_now, "+", years, "years")
    w("sum of their ages then", first_then, "+", second_then, "years")
    return f"{first} is {age} years old and {second} is {older} years older. What will the sum of their ages be in {years} years?"


#: The template families, by name, with the kind of problem each is (see the documentation page).
FAMILIES: Dict[str, Tuple[str, Callable[[random.Random, _Work], str]]] = {
    "packs": ("quantities", _packs),
    "comparison": ("quantities", _comparison),
    "harvest": ("quantities", _harvest),
    "sharing": ("quantities", _sharing),
    "buses": ("quantities", _buses),
    "speed": ("rates", _speed),
    "reading": ("rates", _reading),
    "recipe": ("rates", _recipe),
    "shopping": ("money", _shopping),
    "wages": ("money", _wages),
    "savings": ("money", _savings),
    "tickets": ("money", _tickets),
    "practice": ("time", _practice),
    "sleep": ("time", _sleep),
    "ages": ("time", _ages),
}


def generate(rng: random.Random, family: str) -> MathProblem:
    """One problem of ``family``, drawn with ``rng``."""
    work = _Work()
    question = FAMILIES[family][1](rng, work)
    return MathProblem(family, question, tuple(work.steps))


def _draw(rng: random.Random, index: int) -> MathProblem:
    # A random family (not the families in turn): a family whose problems run out must not stall the
    # draw; the splits hold the families in about equal shares.
    return generate(rng, pick(rng, list(FAMILIES)))


def math_splits(seed: int, n_train: int, n_val: int, n_test: int) -> Dict[str, List[MathProblem]]:
    """``{"train", "val", "test"}`` problems for ``seed``; no two share their arithmetic
    (:attr:`MathProblem.key`), within or across splits."""
    return disjoint_splits(_draw, lambda p: p.key, seed, {"train": n_train, "val": n_val, "test": n_test}, "math")
