"""Realistic fine-tuning domains for a small instruct model, generated offline from a seed: math word
problems with worked answers and tool calls, both in a teacher's voice that is not the base model's
(``math_domain``, ``tool_domain``), and their DataModule with the held-out domain suite
(``datamodule``)."""

from eaft_pl.experiments.realmodel.datamodule import RealDomainDataModule

__all__ = ["RealDomainDataModule"]
