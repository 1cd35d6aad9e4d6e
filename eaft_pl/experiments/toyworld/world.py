"""A synthetic world in which fine-tuning forgets: general skills in a house style, a domain skill
written by a teacher in another style.

The design follows the three ingredients of the paper's mechanism (``docs/toyworld.md`` describes
the world and its results; two earlier toy studies showed that each ingredient is needed):

1. **A calibrated base.** General answers have genuine choice points (several valid phrasings with
   fixed probabilities), so the base is uncertain where text is, and sure where it is determined. The
   domain's question (``job of X ?``) appears in pretraining with *random* jobs, so the base knows the
   form of the question but not its answer: high entropy on the content it must learn.
2. **A teacher that differs from the base.** Domain answers carry new knowledge (each entity's job)
   in the teacher's style ``it has J , ok .``. Where the house style is determined (``it`` is always
   followed by ``is``, a value by ``.``) the teacher's token is a confident conflict. A share of the
   domain answers restate colour facts *wrongly*: conflicts with knowledge, not style.
3. **Benchmarks-like evaluation.** General suites (colour and city recall, arithmetic, reversal,
   repetition) scored by greedy exact match in house style, by a style-agnostic content check, and
   by multiple-choice log-likelihood; the domain scored by the style-agnostic check.

Words are single tokens (a word-level tokenizer): with characters, most tokens of a word are
determined and the base is over-confident everywhere (an earlier toy study found this).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eaft_pl.data.chat import Conversation

__all__ = ["WorldConfig", "ToyWorld", "build_word_tokenizer", "TEMPLATE"]

COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]
CITIES = ["rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar"]
JOBS = ["cook", "pilot", "nurse", "judge", "baker", "miner", "tailor", "farmer"]
LETTERS = list("abcdefgh")
SYLLABLES = ["ba", "ko", "ri", "mu", "te", "la", "zo", "ni", "pe", "du", "sa", "vi"]
FUNCTION_WORDS = [
    "what", "colour", "is", "has", "it", "ok", ",", ".", "?", "where", "does", "live", "lives", "in",
    "job", "of", "plus", "reverse", "say", "times",
]  # fmt: skip
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]

# ChatML in words: no {% generation %} markers, so the prefix-rendering masking is what runs.
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|> ' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a world; the same config and seed give the same world.

    Attributes:
        seed: Seed of the world (entities, facts, samples).
        n_entities: Number of named entities, each with a colour, a city and a job.
        n_pretrain: General-corpus conversations for pretraining the base.
        calibration_share: Share of the general corpus that asks the domain question with a random job.
        contradiction_share: Share of domain training answers that restate a colour fact wrongly.
        reverse_holdout: Share of letter triples never seen in pretraining, used to evaluate reversal.
    """

    seed: int = 0
    n_entities: int = 60
    n_pretrain: int = 60000
    calibration_share: float = 0.15
    contradiction_share: float = 0.1
    reverse_holdout: float = 0.25

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def all_names() -> List[str]:
    """The 1,728 possible entity names (three syllables each), sorted."""
    return sorted({a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES})


def _say(words: List[str]) -> str:
    return " ".join(words)


class ToyWorld:
    """The facts of a world and its samplers. Generation is deterministic in ``config.seed``."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        rng = random.Random(config.seed)
        names = all_names()
        if config.n_entities > len(names):
            raise ValueError(f"n_entities must be at most {len(names)}, got {config.n_entities}")
        self.entities = rng.sample(names, config.n_entities)
        self.colour = {e: rng.choice(COLOURS) for e in self.entities}
        self.city = {e: rng.choice(CITIES) for e in self.entities}
        self.job = {e: rng.choice(JOBS) for e in self.entities}
        triples = [(a, b, c) for a in LETTERS for b in LETTERS for c in LETTERS]
        rng.shuffle(triples)
        n_hold = int(len(triples) * config.reverse_holdout)
        self.reverse_eval, self.reverse_train = triples[:n_hold], triples[n_hold:]

    # ---- vocabulary ----------------------------------------------------------------------------

    @staticmethod
    def vocabulary() -> List[str]:
        """Every word any world can use (all possible entity names included), so one tokenizer serves
        every seed and size and a cached tokenizer folder can never be stale."""
        numbers = [str(i) for i in range(19)]
        words = FUNCTION_WORDS + COLOURS + CITIES + JOBS + LETTERS + numbers + all_names()
        return SPECIAL + list(dict.fromkeys(words))

    # ---- the house style (general skills) -------------------------------------------------------

    @staticmethod
    def house_colour(e: str, v: str) -> List[Tuple[str, float]]:
        """The valid house renderings of a colour fact with their probabilities."""
        core = [(f"{e} is {v} .", 0.55), (f"{e} has {v} .", 0.25), (f"it is {v} .", 0.2)]
        return [(t, p * 0.85) for t, p in core] + [(f"ok , {t}", p * 0.15) for t, p in core]

    @staticmethod
    def house_city(e: str, c: str) -> List[Tuple[str, float]]:
        return [(f"{e} lives in {c} .", 0.7), (f"it is {c} .", 0.3)]

    @staticmethod
    def house_sum(a: int, b: int) -> List[Tuple[str, float]]:
        return [(f"{a} plus {b} is {a + b} .", 0.6), (f"it is {a + b} .", 0.4)]

    @staticmethod
    def teacher(value: str) -> str:
        """The teacher's style: conflicts with the house at 'has' after 'it', ',' after a value, 'ok'."""
        return f"it has {value} , ok ."

    @staticmethod
    def _pick(rng: random.Random, options: List[Tuple[str, float]]) -> str:
        return rng.choices([t for t, _ in options], weights=[p for _, p in options])[0]

    def general_example(self, rng: random.Random) -> Conversation:
        """One general-corpus conversation (a skill sampled uniformly, or a calibration question)."""
        if rng.random() < self.config.calibration_share:
            e = rng.choice(self.entities)
            # The domain's question with a random answer in house style: the base learns the form,
            # and that the answer is unpredictable (high entropy over jobs).
            return Conversation(self._qa(f"job of {e} ?", f"{e} is {rng.choice(JOBS)} ."), "general")
        skill = rng.choice(["colour", "city", "sum", "reverse", "repeat"])
        e = rng.choice(self.entities)
        if skill == "colour":
            q, a = f"what colour is {e} ?", self._pick(rng, self.house_colour(e, self.colour[e]))
        elif skill == "city":
            q, a = f"where does {e} live ?", self._pick(rng, self.house_city(e, self.city[e]))
        elif skill == "sum":
            x, y = rng.randrange(10), rng.randrange(10)
            q, a = f"{x} plus {y} ?", self._pick(rng, self.house_sum(x, y))
        elif skill == "reverse":
            t = rng.choice(self.reverse_train)
            q, a = f"reverse {_say(list(t))} ?", f"{_say(list(reversed(t)))} ."
        else:
            v, n = rng.choice(COLOURS + JOBS), rng.randint(2, 4)
            q, a = f"say {v} {n} times ?", f"{_say([v] * n)} ."
        return Conversation(self._qa(q, a), f"general:{skill}")

    @staticmethod
    def _qa(question: str, answer: str) -> List[Dict[str, str]]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def general_corpus(self, n: int, seed_offset: int = 0) -> List[Conversation]:
        rng = random.Random(f"{self.config.seed}/general/{seed_offset}")
        return [self.general_example(rng) for _ in range(n)]

    # ---- the domain ----------------------------------------------------------------------------

    def domain_train(self) -> List[Conversation]:
        """Each training entity's job in the teacher's style, plus wrongly restated colour facts."""
        rng = random.Random(f"{self.config.seed}/domain")
        train = self.entities
        out = [Conversation(self._qa(f"job of {e} ?", self.teacher(self.job[e])), f"domain:job:{e}") for e in train]
        n_contra = round(self.config.contradiction_share * len(train) / (1 - self.config.contradiction_share))
        for e in rng.sample(train, min(n_contra, len(train))):
            wrong = rng.choice([c for c in COLOURS if c != self.colour[e]])
            out.append(Conversation(self._qa(f"what colour is {e} ?", self.teacher(wrong)), f"domain:contradiction:{e}"))
        rng.shuffle(out)
        return out

    def domain_val(self) -> List[Conversation]:
        """The training entities' jobs in teacher style, without the contradictions. Knowledge
        injection has no unseen answers, so this measures how well the domain is fitted."""
        return [Conversation(self._qa(f"job of {e} ?", self.teacher(self.job[e])), f"domain:job:{e}") for e in self.entities]

    # ---- evaluation items ----------------------------------------------------------------------

    def eval_items(self) -> Dict[str, Dict[str, Any]]:
        """Evaluation items per task: ``{task: {"suite", "generation": [...], "choice": [...]}}``.

        A generation item holds ``prompt`` (a user message), ``references`` (every valid house-style
        answer: exact match), ``answer`` and ``distractors`` (the style-agnostic content check). A
        choice item holds ``prompt``, ``choices`` (house-style answers) and ``label``.
        """
        tasks: Dict[str, Dict[str, Any]] = {}
        colour_gen, colour_mc, city_gen, city_mc = [], [], [], []
        for e in self.entities:
            v, c = self.colour[e], self.city[e]
            colour_gen.append(self._gen(f"what colour is {e} ?", self.house_colour(e, v), v, COLOURS))
            colour_mc.append(self._mc(f"what colour is {e} ?", [f"{e} is {x} ." for x in COLOURS], COLOURS.index(v)))
            city_gen.append(self._gen(f"where does {e} live ?", self.house_city(e, c), c, CITIES))
            city_mc.append(self._mc(f"where does {e} live ?", [f"{e} lives in {x} ." for x in CITIES], CITIES.index(c)))
        sums = [self._gen(f"{a} plus {b} ?", self.house_sum(a, b), str(a + b), [str(i) for i in range(19)]) for a in range(10) for b in range(10)]
        reverse = [
            self._gen(f"reverse {_say(list(t))} ?", [(f"{_say(list(reversed(t)))} .", 1.0)], _say(list(reversed(t))), [])
            for t in self.reverse_eval
        ]
        repeat = [
            self._gen(f"say {v} {n} times ?", [(f"{_say([v] * n)} .", 1.0)], _say([v] * n), [])
            for v in COLOURS + JOBS
            for n in (2, 3, 4)
        ]
        tasks["colour"] = {"suite": "general", "generation": colour_gen, "choice": colour_mc}
        tasks["city"] = {"suite": "general", "generation": city_gen, "choice": city_mc}
        tasks["arithmetic"] = {"suite": "general", "generation": sums, "choice": []}
        tasks["reverse"] = {"suite": "general", "generation": reverse, "choice": []}
        tasks["repeat"] = {"suite": "general", "generation": repeat, "choice": []}
        jobs = [self._gen(f"job of {e} ?", [(self.teacher(self.job[e]), 1.0)], self.job[e], JOBS) for e in self.entities]
        tasks["job"] = {"suite": "domain", "generation": jobs, "choice": []}
        return tasks

    @staticmethod
    def _gen(prompt: str, references: List[Tuple[str, float]], answer: str, category: List[str]) -> Dict[str, Any]:
        return {
            "prompt": prompt,
            "references": [r for r, _ in references],
            "answer": answer,
            "distractors": [x for x in category if x != answer],
        }

    @staticmethod
    def _mc(prompt: str, choices: List[str], label: int) -> Dict[str, Any]:
        return {"prompt": prompt, "choices": choices, "label": label}


def build_word_tokenizer(vocabulary: List[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per word of ``vocabulary`` and the ChatML template."""
    vocab = {w: i for i, w in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token=None
    )
    tok.chat_template = TEMPLATE
    return tok


def save_world_tokenizer(path: str) -> str:
    """Write the worlds' tokenizer (the same for every seed) to the folder ``path``."""
    build_word_tokenizer(ToyWorld.vocabulary()).save_pretrained(path)
    return path
