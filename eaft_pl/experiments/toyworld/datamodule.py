"""DataModules over the synthetic world of :mod:`eaft_pl.experiments.toyworld.world`."""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from eaft_pl.data.base import ChatDataModule
from eaft_pl.data.chat import Conversation
from eaft_pl.evaluation.tasks import GenerationTask, MultipleChoiceTask, PerplexityTask
from eaft_pl.experiments.toyworld.world import ToyWorld, WorldConfig, save_world_tokenizer

__all__ = ["ToyWorldDataModule"]


class ToyWorldDataModule(ChatDataModule):
    """The synthetic world's general corpus (``part: general``, to pretrain the base) or its domain
    set (``part: domain``, to fine-tune), plus the evaluation suites the forgetting callback runs.

    With ``part: domain`` there are two validation sets: ``domain`` (the teacher's answers to the
    training questions: knowledge injection has no unseen answers, so ``val/domain/ce`` measures how
    well the domain is fitted) and ``general`` (a fresh sample of the general distribution, which the
    pretraining corpus largely covers: ``val/general/ce`` tracks how the model's fit of that
    distribution degrades). The tokenizer (one token per word of any world) is (re)written to
    ``tokenizer_name_or_path`` by ``prepare_data``: it is cheap, and a stale folder cannot survive.

    Args:
        part: ``general`` or ``domain``.
        seed: Seed of the world (facts and samples).
        n_entities: Entities of the world.
        n_pretrain: Conversations of the general corpus (``part: general``).
        n_general_val: Held-out general conversations for validation.
        calibration_share: Share of the general corpus asking the domain question with a random answer.
        contradiction_share: Share of domain answers that restate a colour fact wrongly.
        reverse_holdout: Share of letter triples held out of pretraining for the reversal test.
        **kwargs: Options of :class:`~eaft_pl.data.ChatDataModule` (tokenizer path, batch sizes, ...).
    """

    def __init__(
        self,
        part: Literal["general", "domain"] = "domain",
        seed: int = 0,
        n_entities: int = 60,
        n_pretrain: int = 60000,
        n_general_val: int = 500,
        calibration_share: float = 0.15,
        contradiction_share: float = 0.1,
        reverse_holdout: float = 0.25,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_length", 64)
        super().__init__(**kwargs)
        if part not in ("general", "domain"):
            raise ValueError(f"data.init_args.part must be 'general' or 'domain', got {part!r}")
        for name, value in (("calibration_share", calibration_share), ("contradiction_share", contradiction_share), ("reverse_holdout", reverse_holdout)):
            if not 0 <= value < 1:
                raise ValueError(f"data.init_args.{name} must lie in [0, 1), got {value}")
        self.part = part
        self.n_general_val = n_general_val
        self.world = ToyWorld(
            WorldConfig(
                seed=seed,
                n_entities=n_entities,
                n_pretrain=n_pretrain,
                calibration_share=calibration_share,
                contradiction_share=contradiction_share,
                reverse_holdout=reverse_holdout,
            )
        )
        self.files = {"train": f"toyworld:{part}:seed{seed}"}

    @property
    def val_names(self) -> List[str]:
        return ["domain", "general"] if self.part == "domain" else ["general"]

    def prepare_data(self) -> None:
        save_world_tokenizer(self.tokenizer_name_or_path)

    def load_conversations(self, split: str) -> Optional[List[Conversation]]:
        general_val = lambda: self.world.general_corpus(self.n_general_val, seed_offset=1)  # noqa: E731
        if self.part == "general":
            return {"train": lambda: self.world.general_corpus(self.world.config.n_pretrain), "val": general_val}.get(
                split, lambda: None
            )()
        return {
            "train": self.world.domain_train,
            "val": self.world.domain_val,
            "val:general": general_val,
        }.get(split, lambda: None)()

    def evaluation_suites(self) -> Dict[str, List[Any]]:
        """``{suite: [task, ...]}`` for :class:`~eaft_pl.evaluation.ForgettingCallback`."""
        suites: Dict[str, List[Any]] = {}
        for name, spec in self.world.eval_items().items():
            tasks = suites.setdefault(spec["suite"], [])
            tasks.append(GenerationTask(name, spec["generation"]))
            if spec["choice"]:
                tasks.append(MultipleChoiceTask(f"{name}_mc", spec["choice"]))
        # Perplexity of general text (a fresh sample of the house style, choice points included).
        suites["general"].append(PerplexityTask("text", self.world.general_corpus(self.n_general_val, seed_offset=1), self.max_length))
        return suites
