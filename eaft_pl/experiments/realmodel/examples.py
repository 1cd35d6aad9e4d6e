"""One generated example per math template family and per tool, as Markdown: the documentation page's
examples are this output (``python -m eaft_pl.experiments.realmodel.examples``), and a test keeps
them equal."""

from __future__ import annotations

import argparse
import random
from typing import List

from eaft_pl.experiments.realmodel import math_domain, tool_domain

__all__ = ["template_examples"]


def _block(text: str) -> List[str]:
    return ["```text", *text.split("\n"), "```", ""]


def template_examples(seed: int = 0) -> str:
    """Markdown: a heading, the question and the teacher's answer for every math family, then every
    tool's request and call, drawn with ``seed``."""
    rng = random.Random(f"examples:{seed}")
    lines = ["### Math template families", ""]
    for family, (kind, _) in math_domain.FAMILIES.items():
        problem = math_domain.generate(rng, family)
        lines += [f"`{family}` ({kind}, {len(problem.steps)} steps)", "", *_block(f"{problem.question}\n\n{math_domain.teacher_answer(problem)}")]
    lines += ["### Tools", ""]
    for name, request in tool_domain.REQUESTS.items():
        text, arguments = request(rng)
        problem = tool_domain.ToolProblem(text, (name,), name, arguments)
        lines += [f"`{name}`: {tool_domain.CATALOGUE[name]['description']}", "", *_block(f"{text}\n\n{tool_domain.call_text(problem)}")]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    """Print the examples (``--seed`` picks other ones)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the examples")
    print(template_examples(parser.parse_args().seed), end="")


if __name__ == "__main__":
    main()
