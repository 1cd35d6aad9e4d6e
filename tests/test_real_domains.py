"""The realistic domains (math word problems, tool calls): generated deterministically per seed, held
out by construction, every worked answer's arithmetic right, every call valid under its schema; the
DataModule's batches and its domain suite (the scorers themselves: test_scorers.py)."""

import json
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eaft_pl.evaluation.scorers import final_number, parse_tool_call
from eaft_pl.evaluation.tasks import normalise
from eaft_pl.experiments.realmodel import RealDomainDataModule
from eaft_pl.experiments.realmodel.math_domain import FAMILIES, TEACHER_STYLE, generate, math_splits, teacher_answer
from eaft_pl.experiments.realmodel import tool_domain
from eaft_pl.experiments.realmodel.examples import template_examples
from eaft_pl.experiments.realmodel.splits import disjoint_splits
from eaft_pl.experiments.realmodel.tool_domain import CATALOGUE, call_text, check_arguments, system_prompt, tool_splits

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_TOKENIZER = str(REPO / "data" / "quickstart" / "tokenizer")
SPLITS = {"math": math_splits, "tools": tool_splits}


# ---- determinism and held-out problems ------------------------------------------------------------


@pytest.mark.parametrize("domain", ["math", "tools"])
def test_the_generators_are_deterministic_per_seed(domain):
    make = SPLITS[domain]
    assert make(3, 200, 20, 30) == make(3, 200, 20, 30)
    assert make(3, 200, 20, 30)["train"] != make(4, 200, 20, 30)["train"]
    assert make(3, 200, 20, 30)["test"] != make(4, 200, 20, 30)["test"]


def test_the_generators_do_not_depend_on_the_process():
    # String hashing is salted per process (PYTHONHASHSEED): a generator that iterated a set of strings
    # would differ between two runs with the same seed.
    code = (
        "import json; from eaft_pl.experiments.realmodel.math_domain import math_splits, teacher_answer; "
        "from eaft_pl.experiments.realmodel.tool_domain import tool_splits, call_text; "
        "print(json.dumps([[teacher_answer(p) for p in math_splits(1, 30, 5, 5)['train']], "
        "[call_text(p) for p in tool_splits(1, 30, 5, 5, 3)['train']], [p.tools for p in tool_splits(1, 30, 5, 5, 3)['train']]]))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": h}).stdout
        for h in ("1", "2")
    ]
    assert runs[0] == runs[1] and len(json.loads(runs[0])[0]) == 30


@pytest.mark.parametrize("domain", ["math", "tools"])
def test_held_out_problems_are_disjoint_and_do_not_depend_on_the_training_size(domain):
    make = SPLITS[domain]
    splits = make(0, 1500, 100, 200)
    keys = {name: [p.key for p in problems] for name, problems in splits.items()}
    for name, problems in splits.items():
        assert len(problems) == {"train": 1500, "val": 100, "test": 200}[name]
        assert len(set(keys[name])) == len(problems)  # no repeat within a split
    assert not set(keys["test"]) & set(keys["train"])
    assert not set(keys["test"]) & set(keys["val"])
    assert not set(keys["val"]) & set(keys["train"])
    assert make(0, 10, 100, 200)["test"] == splits["test"]  # the held-out set is fixed by seed and n_test


def test_a_generator_that_runs_out_of_problems_says_which_size_to_lower():
    def digit(rng, index):
        return rng.randint(0, 9)  # ten distinct problems at most

    assert sorted(disjoint_splits(digit, lambda d: d, 0, {"train": 10}, "digits")["train"]) == list(range(10))
    with pytest.raises(ValueError, match=r"digits: found only 8 distinct train problems of 9.*lower data.init_args.n_train"):
        disjoint_splits(digit, lambda d: d, 0, {"test": 2, "train": 9}, "digits")


# ---- math -----------------------------------------------------------------------------------------

_EQUATION = re.compile(r"(\d+) ([-+×÷]) (\d+) = \$?(\d+)")
_APPLY = {"+": operator.add, "-": operator.sub, "×": operator.mul, "÷": operator.truediv}
# Facts a step may use that the question does not state: days in a week, minutes in an hour.
_KNOWN = {7, 60}


def test_every_worked_answer_is_right_and_grounded_in_the_question():
    problems = [p for split in math_splits(1, 1500, 0, 0).values() for p in split]
    assert {p.family for p in problems} == set(FAMILIES)
    for p in problems:
        text = teacher_answer(p)
        equations = _EQUATION.findall(text)
        assert 2 <= len(equations) == len(p.steps) <= 4, text
        known = {int(n) for n in re.findall(r"\d+", p.question)} | _KNOWN
        for left, op, right, result in equations:
            # Recomputed from the text, not read from the Step that wrote it.
            assert _APPLY[op](int(left), int(right)) == int(result), text
            assert int(left) in known and int(right) in known, f"an operand from nowhere in: {text}"
            known.add(int(result))
        assert int(equations[-1][3]) == p.answer == final_number(text), text
        assert 0 <= p.answer < 1000
        assert re.search(TEACHER_STYLE, normalise(text)), text  # as GenerationTask sees an output


def test_every_family_draws_varied_problems():
    import random

    for family in FAMILIES:
        rng = random.Random(family)
        drawn = [generate(rng, family) for _ in range(40)]
        assert len({p.question for p in drawn}) >= 30, family
        assert len({p.answer for p in drawn}) >= 10, family


# ---- tool calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("offered", [1, 3])
def test_every_call_parses_and_matches_its_schema(offered):
    problems = [p for split in tool_splits(2, 800, 50, 50, offered).values() for p in split]
    assert {p.name for p in problems} == set(CATALOGUE)
    for p in problems:
        assert len(p.tools) == offered == len(set(p.tools)) and p.name in p.tools
        assert check_arguments(p.name, p.arguments) == [], p
        assert parse_tool_call(call_text(p)) == p.call
        assert re.search(tool_domain.TEACHER_STYLE, normalise(call_text(p)))
        lines = system_prompt(p.tools).split("\n")
        offered_schemas = [json.loads(line) for line in lines if line.startswith("{")]
        assert [s["name"] for s in offered_schemas] == list(p.tools)


def test_the_schema_check_finds_wrong_calls():
    assert check_arguments("get_weather", {"city": "Oslo", "unit": "kelvin"}) == ["unit: 'kelvin' is not one of ['celsius', 'fahrenheit']"]
    assert check_arguments("set_timer", {"minutes": "5", "label": "tea"}) == ["minutes: '5' is not of type integer"]
    assert check_arguments("set_timer", {"label": "tea", "seconds": 5}) == ["unknown argument 'seconds'", "missing argument 'minutes'"]
    assert check_arguments("fly", {}) == ["unknown function 'fly'"]


def test_requests_that_need_a_mapping_get_the_mapped_argument():
    problems = [p for p in tool_splits(5, 800, 0, 0)["train"]]
    currency = next(p for p in problems if p.name == "convert_currency")
    assert tool_domain._CURRENCIES[currency.arguments["from_currency"]] in currency.request
    event = next(p for p in problems if p.name == "create_event")
    year, month, day = event.arguments["date"].split("-")
    assert f"{tool_domain._MONTHS[int(month) - 1]} {int(day)}, {year}" in event.request


# ---- the DataModule -------------------------------------------------------------------------------


def _module(domain, **kwargs):
    # The quickstart tokenizer has one token per character: a tool call's system prompt alone takes ~400.
    kwargs = {"n_train": 40, "n_val": 8, "n_test": 12, "batch_size": 4, "max_length": 1024, **kwargs}
    return RealDomainDataModule(domain=domain, tokenizer_name_or_path=QUICKSTART_TOKENIZER, **kwargs)


@pytest.mark.parametrize("domain", ["math", "tools"])
def test_batches_supervise_only_the_teachers_answer(domain):
    dm = _module(domain)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4
    problems = {f"{domain}:seed0:train:{i}": p for i, p in enumerate(dm.problems()["train"])}
    for row, source in enumerate(batch["sources"]):
        p = problems[source]
        answer = teacher_answer(p) if domain == "math" else call_text(p)
        supervised = batch["input_ids"][row][batch["labels"][row] != -100].tolist()
        assert supervised == dm.tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert len(dm.datasets["val"]) == 8 and "test" not in dm.datasets


def test_the_same_seed_gives_the_same_conversations():
    assert [c.messages for c in _module("tools", seed=7).load_conversations("train")] == [
        c.messages for c in _module("tools", seed=7).load_conversations("train")
    ]


@pytest.mark.parametrize("domain, metrics", [("math", {"accuracy", "answered", "style"}), ("tools", {"accuracy", "name", "parsed", "style"})])
def test_the_domain_suite_scores_the_held_out_problems(domain, metrics):
    dm = _module(domain, general=[])
    suites = dm.evaluation_suites()
    assert list(suites) == ["domain"]
    (task,) = suites["domain"]
    assert task.name == domain and len(task.items) == 12
    held_out = {json.dumps(c.messages[-2]["content"]) for c in dm.load_conversations("test")}
    assert {json.dumps(item["prompt"]) for item in task.items} == held_out
    # The teacher's own answers score 1 on every metric, in the form GenerationTask hands them over.
    answers = [teacher_answer(p) if domain == "math" else call_text(p) for p in dm.problems()["test"]]
    assert task.score([normalise(a) for a in answers]) == {m: 1.0 for m in metrics}


def test_the_general_suite_is_built_from_the_options():
    dm = _module("math", seed=3, general=["facts", "prose"], general_sizes={"n_facts": 5, "n_prose": 2, "prose_tokens": 16})
    suites = dm.evaluation_suites()
    assert list(suites) == ["general", "domain"]
    facts, prose = suites["general"]
    assert (facts.name, len(facts.items)) == ("facts", 5) and (prose.name, len(prose.texts), prose.max_length) == ("prose", 2, 16)
    # Seeded like the domain, and built afresh at every call (the agreement task keeps its base).
    assert facts.items == _module("math", seed=3, general=["facts"], general_sizes={"n_facts": 5}).general_suites()["general"][0].items
    assert dm.general_suites()["general"][0] is not facts
    with pytest.raises(ValueError, match=r"data.init_args.general names \['facs'\]"):
        _module("math", general=["facs"])


def test_general_suites_join_the_domain_suite():
    class WithGeneral(RealDomainDataModule):
        def general_suites(self):
            return {"general": ["a task"]}

    dm = WithGeneral(tokenizer_name_or_path=QUICKSTART_TOKENIZER, n_train=5, n_val=2, n_test=3)
    assert list(dm.evaluation_suites()) == ["general", "domain"]

    class Clash(RealDomainDataModule):
        def general_suites(self):
            return {"domain": []}

    with pytest.raises(ValueError, match="must not name a suite 'domain'"):
        Clash(tokenizer_name_or_path=QUICKSTART_TOKENIZER, n_train=5, n_val=2, n_test=3).evaluation_suites()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"domain": "chemistry"}, "data.init_args.domain must be one of"),
        ({"n_test": 0}, "data.init_args.n_test must be >= 1"),
        ({"domain": "tools", "tools_offered": 0}, "data.init_args.tools_offered must be an integer from 1"),
        ({"max_new_tokens": 0}, "data.init_args.max_new_tokens must be >= 1"),
    ],
)
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RealDomainDataModule(tokenizer_name_or_path=QUICKSTART_TOKENIZER, **kwargs)


def test_the_documented_examples_are_the_generators_output():
    page = (REPO / "docs" / "real-domains.md").read_text()
    shown = page.split("<!-- examples:start -->\n")[1].split("<!-- examples:end -->")[0]
    assert shown == template_examples(0)


def test_the_cli_sees_the_256_token_default():
    # LightningCLI reads defaults from signatures: a default set on **kwargs inside __init__ would be
    # overridden by ChatDataModule's 2048.
    import inspect

    assert inspect.signature(RealDomainDataModule).parameters["max_length"].default == 256
    assert RealDomainDataModule(tokenizer_name_or_path=QUICKSTART_TOKENIZER).max_length == 256
