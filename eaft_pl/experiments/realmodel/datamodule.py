"""The DataModule of the realistic domains: generated offline, answered in a teacher's voice."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Sequence

from eaft_pl.data.chat import Conversation
from eaft_pl.data.base import ChatDataModule
from eaft_pl.evaluation.scorers import FinalNumberScorer, ToolCallScorer
from eaft_pl.evaluation.tasks import GenerationTask
from eaft_pl.experiments.realmodel import general_suites as general_module, math_domain, tool_domain

__all__ = ["RealDomainDataModule", "DOMAINS"]

#: The domains and how many tokens a generated answer may take (a worked math answer is long, a call short).
DOMAINS: Dict[str, int] = {"math": 192, "tools": 80}


class RealDomainDataModule(ChatDataModule):
    """A realistic fine-tuning domain for a small instruct model, generated from a seed:
    grade-school math word problems (``domain: math``) or tool calls (``domain: tools``), both
    answered in a teacher's style that is not the base model's own (the documentation's page
    *Realistic domains* lists the templates).

    Splits: ``train`` (``n_train`` conversations), ``val`` (``n_val``, the validation set
    ``val/domain/ce``) and ``test`` (``n_test`` held-out problems, the ones the domain suite scores).
    No two problems of any splits share their arithmetic (math) or their call (tools), so the held-out
    score measures generalisation, not recall; the held-out problems depend only on ``seed`` and
    ``n_test``.

    :meth:`evaluation_suites` gives the ``domain`` suite, one :class:`~eaft_pl.evaluation.GenerationTask`
    over the held-out problems, scored by their final number (math) or their parsed call (tools),
    whatever the answer's style, with a ``style`` metric for the teacher's, and the ``general`` suite of
    skills a fine-tune can erode (:mod:`~eaft_pl.experiments.realmodel.general_suites`: prose
    perplexity, world facts, agreement and KL with the base's own answers), seeded by ``seed`` too.

    Args:
        domain: ``math`` or ``tools``.
        seed: Seed of the generator: the same seed gives the same problems in every split.
        n_train: Training conversations.
        n_val: Validation conversations.
        n_test: Held-out problems for the domain suite (and the ``test`` split).
        tools_offered: Functions offered with each tool request (the one to call among them); one keeps
            examples within 256 SmolLM2 tokens, two take about 250 on median.
        max_new_tokens: Generation budget of the domain suite; None takes the domain's default
            (192 for math, 80 for tools).
        max_length: Truncate conversations to this many tokens (every example of the defaults fits
            256 SmolLM2 tokens).
        general: The general tasks to score (of ``prose``, ``facts``, ``instructions``, ``agreement``);
            an empty list scores the domain only.
        general_sizes: Item counts and token budgets of the general tasks (``n_prose``, ``prose_tokens``,
            ``n_facts``, ``n_agreement``, ``agreement_tokens``, ...; see
            :func:`~eaft_pl.experiments.realmodel.general_suites.candidate_tasks`), which set the cost
            of an evaluation pass.
        **kwargs: Options of :class:`~eaft_pl.data.ChatDataModule` (``tokenizer_name_or_path``, batch
            sizes, ...).
    """

    def __init__(
        self,
        domain: Literal["math", "tools"] = "math",
        seed: int = 0,
        n_train: int = 2000,
        n_val: int = 100,
        n_test: int = 100,
        tools_offered: int = 1,
        max_new_tokens: Optional[int] = None,
        max_length: int = 256,
        general: Sequence[str] = general_module.KEPT,
        general_sizes: Optional[Dict[str, int]] = None,
        **kwargs: Any,
    ) -> None:
        # max_length is a parameter here, not a default set on kwargs, so that the CLI shows and passes 256.
        super().__init__(max_length=max_length, **kwargs)
        if domain not in DOMAINS:
            raise ValueError(f"data.init_args.domain must be one of {list(DOMAINS)}, got {domain!r}")
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value < 1:
                raise ValueError(f"data.init_args.{name} must be >= 1, got {value}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"data.init_args.max_new_tokens must be >= 1 or null (the domain's default), got {max_new_tokens}")
        self.domain = domain
        self.seed = seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.tools_offered = tools_offered
        self.max_new_tokens = max_new_tokens or DOMAINS[domain]
        self.files = {"train": f"realmodel:{domain}:seed{seed}"}
        self._problems: Optional[Dict[str, List[Any]]] = None
        tool_domain.check_offered(tools_offered)
        self.general = list(general)
        self.general_sizes = dict(general_sizes or {})
        unknown = [name for name in self.general if name not in general_module.CANDIDATES]
        if unknown:
            raise ValueError(f"data.init_args.general names {unknown}; choose among {list(general_module.CANDIDATES)}")

    def problems(self) -> Dict[str, List[Any]]:
        """The generated problems of every split (:class:`~eaft_pl.experiments.realmodel.math_domain.MathProblem`
        or :class:`~eaft_pl.experiments.realmodel.tool_domain.ToolProblem`), made once."""
        if self._problems is None:
            n = self.sizes
            if self.domain == "math":
                self._problems = math_domain.math_splits(self.seed, n["train"], n["val"], n["test"])
            else:
                self._problems = tool_domain.tool_splits(self.seed, n["train"], n["val"], n["test"], self.tools_offered)
        return self._problems

    def conversation(self, problem: Any, source: str) -> Conversation:
        """A problem as a training conversation: the prompt (and the tools' system prompt) and the
        teacher's answer."""
        if self.domain == "math":
            return Conversation([{"role": "user", "content": problem.question}, {"role": "assistant", "content": math_domain.teacher_answer(problem)}], source)
        messages = [
            {"role": "system", "content": tool_domain.system_prompt(problem.tools)},
            {"role": "user", "content": problem.request},
            {"role": "assistant", "content": tool_domain.call_text(problem)},
        ]
        return Conversation(messages, source)

    def load_conversations(self, split: str) -> Optional[List[Conversation]]:
        problems = self.problems().get(split)
        if problems is None:
            return None
        return [self.conversation(p, f"{self.domain}:seed{self.seed}:{split}:{i}") for i, p in enumerate(problems)]

    def eval_items(self) -> List[Dict[str, Any]]:
        """The held-out problems as :class:`~eaft_pl.evaluation.GenerationTask` items."""
        if self.domain == "math":
            return [{"prompt": p.question, "answer": p.answer} for p in self.problems()["test"]]
        return [{"prompt": p.request, "system": tool_domain.system_prompt(p.tools), "call": p.call} for p in self.problems()["test"]]

    def domain_task(self) -> GenerationTask:
        """The domain's generation task over the held-out problems."""
        scorer = (
            FinalNumberScorer(style_pattern=math_domain.TEACHER_STYLE)
            if self.domain == "math"
            else ToolCallScorer(style_pattern=tool_domain.TEACHER_STYLE)
        )
        return GenerationTask(self.domain, self.eval_items(), max_new_tokens=self.max_new_tokens, scorer=scorer)

    def general_suites(self) -> Dict[str, List[Any]]:
        """The ``general`` suite of the tasks named by ``general`` (fresh tasks at every call: the
        agreement task takes its base at its first evaluation)."""
        if not self.general:
            return {}
        return general_module.general_suites(self.seed, include=self.general, **self.general_sizes)

    def evaluation_suites(self) -> Dict[str, List[Any]]:
        """``{suite: [task, ...]}`` for :class:`~eaft_pl.evaluation.ForgettingCallback`: the general
        suites and ``domain``."""
        suites = dict(self.general_suites())
        if "domain" in suites:
            raise ValueError(f"{type(self).__name__}.general_suites() must not name a suite 'domain': it is the domain's own")
        suites["domain"] = [self.domain_task()]
        return suites
