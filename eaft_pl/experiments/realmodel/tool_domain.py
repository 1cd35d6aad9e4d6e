"""Tool calls: a catalogue of functions with JSON schemas, user requests in varied phrasings, and the
teacher's answer, the one call in a fixed format.

Each problem offers the function the request needs (and, with ``offered`` above one, others drawn
from :data:`CATALOGUE`) in the system prompt (:func:`system_prompt`) and asks for something in plain
words; the teacher answers with nothing but::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}
    </tool_call>

The functions go in the system prompt, not in the chat template's ``tools``, because a template that
does not render ``tools`` (SmolLM2's ChatML template does not) would drop them silently; the
system prompt reaches the model under every template. Some arguments are the request's own words, some
need a small mapping (a currency's name to its code, a month to its number, hours to minutes), so the
content is more than copying.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from eaft_pl.experiments.realmodel.splits import disjoint_splits, pick

__all__ = ["CATALOGUE", "REQUESTS", "ToolProblem", "check_offered", "TEACHER_STYLE", "call_text", "check_arguments", "system_prompt", "tool_splits"]

#: A regular expression of the teacher's style: the answer is one ``<tool_call>`` block and nothing else.
TEACHER_STYLE = r"^<tool_call> ?\{.*\} ?</tool_call>$"

_INSTRUCTIONS = 'Functions you may call (JSON schemas). Reply with one <tool_call>{"name": ..., "arguments": ...}</tool_call> block.'


def _fn(name: str, description: str, properties: Dict[str, Any], required: List[str]) -> Dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }


_STRING = {"type": "string"}
_NUMBER = {"type": "number"}
_INTEGER = {"type": "integer"}

_UNITS = {  # argument value -> how requests say it
    "kilometer": ("kilometers", "km"),
    "mile": ("miles",),
    "kilogram": ("kilograms", "kg"),
    "pound": ("pounds", "lbs"),
    "liter": ("liters", "litres"),
    "gallon": ("gallons",),
    "meter": ("meters", "metres"),
    "foot": ("feet",),
}
_CONVERSIONS = (("kilometer", "mile"), ("kilogram", "pound"), ("liter", "gallon"), ("meter", "foot"))
_CURRENCIES = {
    "USD": "US dollars", "EUR": "euros", "GBP": "British pounds", "JPY": "Japanese yen", "CHF": "Swiss francs",
    "CAD": "Canadian dollars", "AUD": "Australian dollars", "INR": "Indian rupees", "MXN": "Mexican pesos",
    "SEK": "Swedish kronor",
}
_STOCKS = {
    "AAPL": "Apple", "MSFT": "Microsoft", "GOOGL": "Alphabet", "AMZN": "Amazon", "TSLA": "Tesla", "NVDA": "Nvidia",
    "NFLX": "Netflix", "KO": "Coca-Cola", "NKE": "Nike", "DIS": "Disney",
}
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December")

#: The functions, in the layout of the ``function`` part of an OpenAI tool definition.
CATALOGUE: Dict[str, Dict[str, Any]] = {
    f["name"]: f
    for f in (
        _fn("get_weather", "Current weather in a city.", {"city": _STRING, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
        _fn(
            "convert_units",
            "Convert a quantity from one unit to another.",
            # Not an enum of the eight units, which would take a third of the token budget of an example.
            {"value": _NUMBER, "from_unit": {"type": "string", "description": "singular, e.g. mile"}, "to_unit": _STRING},
            ["value", "from_unit", "to_unit"],
        ),
        _fn(
            "convert_currency",
            "Convert money between currencies (ISO 4217 codes).",
            {"amount": _NUMBER, "from_currency": _STRING, "to_currency": _STRING},
            ["amount", "from_currency", "to_currency"],
        ),
        _fn(
            "create_event",
            "Add an event to the user's calendar.",
            {"title": _STRING, "date": {"type": "string", "description": "YYYY-MM-DD"}, "time": {"type": "string", "description": "HH:MM, 24-hour"}},
            ["title", "date", "time"],
        ),
        _fn("set_timer", "Start a countdown timer.", {"minutes": _INTEGER, "label": _STRING}, ["minutes", "label"]),
        _fn("search_web", "Search the web.", {"query": _STRING, "max_results": _INTEGER}, ["query"]),
        _fn("get_stock_price", "Latest price of a stock.", {"symbol": {"type": "string", "description": "ticker symbol"}}, ["symbol"]),
        _fn("translate_text", "Translate text into another language.", {"text": _STRING, "target_language": _STRING}, ["text", "target_language"]),
        _fn(
            "get_directions",
            "Route between two places.",
            {"origin": _STRING, "destination": _STRING, "mode": {"type": "string", "enum": ["driving", "walking", "transit", "cycling"]}},
            ["origin", "destination", "mode"],
        ),
    )
}

_CITIES = (
    "Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Dublin", "Santiago", "Seoul",
    "Prague", "Austin", "Mumbai", "Perth", "Vienna", "Accra", "Bogota", "Helsinki", "Marseille", "Kyoto", "Boston", "Manila",
)
_EVENT_TITLES = (
    "Dentist appointment", "Team meeting", "Lunch with Sara", "Piano lesson", "Project review", "Yoga class",
    "Call with the bank", "Parent-teacher meeting", "Book club", "Flight to Rome", "Car service", "Birthday dinner",
)
_TIMER_LABELS = ("pasta", "laundry", "tea", "workout", "bread", "study break", "eggs", "parking", "nap", "pizza")
_QUERIES = (
    "best hiking trails near {city}", "how to fix a leaking tap", "cheap flights to {city}", "vegetarian lasagna recipe",
    "museums open on Monday in {city}", "how to repot a cactus", "history of the bicycle", "beginner running plan",
    "public holidays in {city} this year", "how to remove coffee stains", "used bikes for sale in {city}",
)
_PHRASES = (
    "good morning", "where is the train station", "thank you very much", "how much does this cost", "I would like a coffee",
    "see you tomorrow", "the meeting is cancelled", "happy birthday", "can you help me", "the museum opens at nine",
)
_LANGUAGES = ("Spanish", "French", "German", "Italian", "Japanese", "Portuguese", "Korean", "Dutch", "Swahili", "Turkish")
_PLACES = (
    "the central station", "the airport", "the city library", "Riverside Park", "the main hospital", "the old harbour",
    "the university campus", "the football stadium", "my office", "the shopping mall",
)
_MODE_WORDS = {"driving": ("drive", "go by car"), "walking": ("walk", "go on foot"), "transit": ("take public transport", "go by bus or train"), "cycling": ("cycle", "go by bike")}


def _weather(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    city = pick(rng, _CITIES)
    unit = pick(rng, ("celsius", "fahrenheit", None))
    if unit is None:
        request = pick(rng, (f"What's the weather like in {city} right now?", f"Is it raining in {city}?", f"How's the weather in {city} today?"))
        return request, {"city": city}
    request = pick(rng, (f"What's the temperature in {city} in {unit.capitalize()}?", f"Check the weather in {city} for me, in degrees {unit}."))
    return request, {"city": city, "unit": unit}


def _units(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    pair = pick(rng, _CONVERSIONS)
    source, target = pair if rng.random() < 0.5 else pair[::-1]
    value = pick(rng, (rng.randint(2, 500), rng.randint(1, 99) + pick(rng, (0.5, 0.25))))
    said, to_said = pick(rng, _UNITS[source]), _UNITS[target][0]
    request = pick(rng, (f"How many {to_said} is {value} {said}?", f"Convert {value} {said} to {to_said}.", f"What is {value} {said} in {to_said}?"))
    return request, {"value": value, "from_unit": source, "to_unit": target}


def _currency(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    codes = list(_CURRENCIES)
    source = pick(rng, codes)
    target = pick(rng, [c for c in codes if c != source])
    amount = pick(rng, (5 * rng.randint(1, 200), rng.randint(10, 5000)))
    names = _CURRENCIES[source], _CURRENCIES[target]
    request = pick(
        rng,
        (
            f"How much is {amount} {names[0]} in {names[1]}?",
            f"Convert {amount} {names[0]} to {names[1]}, please.",
            f"I have {amount} {names[0]}. What is that in {names[1]}?",
        ),
    )
    return request, {"amount": amount, "from_currency": source, "to_currency": target}


def _event(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    title, year, month, day = pick(rng, _EVENT_TITLES), pick(rng, (2025, 2026, 2027)), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute = rng.randint(7, 20), pick(rng, (0, 15, 30, 45))
    clock = f"{(hour - 1) % 12 + 1}{':%02d' % minute if minute else ''} {'am' if hour < 12 else 'pm'}"
    when = f"{_MONTHS[month - 1]} {day}, {year} at {clock}"
    request = pick(rng, (f"Put '{title}' on my calendar for {when}.", f"Schedule {title.lower()} on {when}.", f"Add an event called '{title}' on {when}."))
    # A title asked for in lower case is written as asked; the scorer ignores case anyway.
    said_title = title.lower() if request.startswith("Schedule") else title
    return request, {"title": said_title, "date": f"{year}-{month:02d}-{day:02d}", "time": f"{hour:02d}:{minute:02d}"}


def _timer(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    label = pick(rng, _TIMER_LABELS)
    if rng.random() < 0.3:
        hours = rng.randint(1, 3)
        return f"Set a timer for {hours} hour{'s' if hours > 1 else ''} for the {label}.", {"minutes": 60 * hours, "label": label}
    minutes = rng.randint(1, 90)
    request = pick(rng, (f"Set a {minutes}-minute timer for the {label}.", f"Start a timer: {minutes} minutes, label it {label}.", f"Remind me about the {label} in {minutes} minutes with a timer."))
    return request, {"minutes": minutes, "label": label}


def _search(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    query = pick(rng, _QUERIES).format(city=pick(rng, _CITIES))
    if rng.random() < 0.5:
        return pick(rng, (f"Search the web for \"{query}\".", f"Look up \"{query}\" online.")), {"query": query}
    count = rng.randint(2, 10)
    return f"Find {count} results for \"{query}\".", {"query": query, "max_results": count}


def _stock(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    symbol = pick(rng, list(_STOCKS))
    company = _STOCKS[symbol]
    request = pick(rng, (f"What's {company} stock trading at?", f"Get me the latest share price of {company}.", f"How is {company} doing on the stock market right now?"))
    return request, {"symbol": symbol}


def _translate(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    text, language = pick(rng, _PHRASES), pick(rng, _LANGUAGES)
    request = pick(rng, (f"Translate \"{text}\" into {language}.", f"How do you say \"{text}\" in {language}?"))
    return request, {"text": text, "target_language": language}


def _directions(rng: random.Random) -> Tuple[str, Dict[str, Any]]:
    origin = pick(rng, _PLACES)
    destination = pick(rng, [p for p in _PLACES if p != origin])
    mode = pick(rng, list(_MODE_WORDS))
    verb = pick(rng, _MODE_WORDS[mode])
    request = pick(rng, (f"How do I get from {origin} to {destination}? I want to {verb}.", f"Directions from {origin} to {destination}, please; I'll {verb}."))
    return request, {"origin": origin, "destination": destination, "mode": mode}


#: A request generator per function of :data:`CATALOGUE`: ``rng -> (request, arguments)``.
REQUESTS: Dict[str, Callable[[random.Random], Tuple[str, Dict[str, Any]]]] = {
    "get_weather": _weather,
    "convert_units": _units,
    "convert_currency": _currency,
    "create_event": _event,
    "set_timer": _timer,
    "search_web": _search,
    "get_stock_price": _stock,
    "translate_text": _translate,
    "get_directions": _directions,
}


@dataclass(frozen=True)
class ToolProblem:
    """A request, the functions offered with it, and the call that answers it.

    Attributes:
        request: What the user asks.
        tools: Names of the functions offered (the one called among them), in the order listed.
        name: The function to call.
        arguments: Its arguments.
    """

    request: str
    tools: Tuple[str, ...]
    name: str
    arguments: Dict[str, Any]

    @property
    def call(self) -> Dict[str, Any]:
        """``{"name", "arguments"}``, as a scorer compares it."""
        return {"name": self.name, "arguments": dict(self.arguments)}

    @property
    def key(self) -> Tuple[str, str]:
        """What makes two problems the same: the call (its wording and the offered functions aside)."""
        return self.name, json.dumps(self.arguments, sort_keys=True)


def system_prompt(tools: Tuple[str, ...]) -> str:
    """The instructions and the schemas of ``tools``, one compact JSON object per line."""
    schemas = "\n".join(json.dumps(CATALOGUE[name], separators=(",", ":")) for name in tools)
    return f"{_INSTRUCTIONS}\n<tools>\n{schemas}\n</tools>"


def call_text(problem: ToolProblem) -> str:
    """The teacher's answer: the call in a ``<tool_call>`` block."""
    return f"<tool_call>\n{json.dumps(problem.call)}\n</tool_call>"


def check_arguments(name: str, arguments: Dict[str, Any]) -> List[str]:
    """What is wrong with ``arguments`` for function ``name`` under its schema: unknown or missing keys,
    wrong types, values outside an enum. An empty list is a valid call."""
    if name not in CATALOGUE:
        return [f"unknown function {name!r}"]
    schema = CATALOGUE[name]["parameters"]
    properties = schema["properties"]
    problems = [f"unknown argument {k!r}" for k in arguments if k not in properties]
    problems += [f"missing argument {k!r}" for k in schema["required"] if k not in arguments]
    types = {"string": (str,), "number": (int, float), "integer": (int,)}
    for key, value in arguments.items():
        spec = properties.get(key, {})
        if "type" in spec and (isinstance(value, bool) or not isinstance(value, types[spec["type"]])):
            problems.append(f"{key}: {value!r} is not of type {spec['type']}")
        if "enum" in spec and value not in spec["enum"]:
            problems.append(f"{key}: {value!r} is not one of {spec['enum']}")
    return problems


def _draw(rng: random.Random, offered: int) -> ToolProblem:
    name = pick(rng, list(CATALOGUE))
    request, arguments = REQUESTS[name](rng)
    others = rng.sample([n for n in CATALOGUE if n != name], offered - 1)
    tools = tuple(rng.sample([name, *others], offered))  # the right function at a random place
    return ToolProblem(request, tools, name, arguments)


def check_offered(offered: int) -> None:
    """Refuse a number of offered functions outside 1 to the catalogue's size."""
    if isinstance(offered, bool) or not isinstance(offered, int) or not 1 <= offered <= len(CATALOGUE):
        raise ValueError(f"data.init_args.tools_offered must be an integer from 1 to {len(CATALOGUE)}, got {offered!r}")


def tool_splits(seed: int, n_train: int, n_val: int, n_test: int, offered: int = 1) -> Dict[str, List[ToolProblem]]:
    """``{"train", "val", "test"}`` problems for ``seed``, each offering ``offered`` functions (the
    right one among them); no two ask for the same call (:attr:`ToolProblem.key`), within or across
    splits.

    Raises:
        ValueError: ``offered`` is not between 1 and the size of :data:`CATALOGUE`.
    """
    check_offered(offered)
    draw = lambda rng, index: _draw(rng, offered)  # noqa: E731
    return disjoint_splits(draw, lambda p: p.key, seed, {"train": n_train, "val": n_val, "test": n_test}, "tools")
