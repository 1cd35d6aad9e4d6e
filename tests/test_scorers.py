"""The scorers of generated answers on hand-made right, wrong and edge cases (a math answer's final
number, a parsed tool call), and GenerationTask with a scorer."""

import pytest

from eaft_pl.evaluation.scorers import FinalNumberScorer, ToolCallScorer, final_number, same_arguments
from eaft_pl.evaluation.tasks import GenerationTask, normalise
from test_toyworld import ScriptedModel

# Answer styles to report as ``style``: a bold final-answer line, a bare <tool_call> block (any regular
# expression would do; these are the realistic domains' teachers').
MATH_STYLE = r"\*\*Answer:\*\* -?\d+$"
TOOL_STYLE = r"^<tool_call> ?\{.*\} ?</tool_call>$"


# ---- the final number ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, answer, accuracy",
    [
        ("She has 12 + 15 = 27 pencils.\n#### 27", 27, 1.0),  # GSM8K
        ("So the total is 27. The answer is 27.", 27, 1.0),
        ("The total is \\boxed{27}.", 27, 1.0),
        ("She pays 27 dollars", 27, 1.0),  # the last number, no marker
        ("Step 1: 3 × 9 = 27.\n**Answer:** 27", 27, 1.0),  # the teacher
        ("The answer is 27. Next time she buys 4 more packs for 2 friends.", 27, 1.0),  # numbers after the answer
        ("He earns $1,250 in total.", 1250, 1.0),  # thousands separator and currency sign
        ("Answer: 1,250.00", 1250, 1.0),
        ("The answer is 27.5", 27, 0.0),  # a decimal is not the integer
        ("The answer is 26. She had 27 at first.", 27, 0.0),
        ("#### 72", 27, 0.0),
        ("1,2,7", 127, 0.0),  # a list, not a grouped number
        ("She has many pencils.", 27, 0.0),  # no number
        ("The answer is unclear; she had 27.", 27, 1.0),  # a marker without a number after it is skipped
        ("The difference is -3", -3, 1.0),
    ],
)
def test_the_final_number_scorer(output, answer, accuracy):
    scores = FinalNumberScorer()(normalise(output), {"answer": answer})
    assert scores["accuracy"] == accuracy
    assert scores["answered"] == float(final_number(output) is not None)


def test_the_final_number_scorer_reports_style_and_refuses_bad_items():
    scorer = FinalNumberScorer(style_pattern=MATH_STYLE)
    assert scorer("Step 1: 3 × 9 = 27. **Answer:** 27", {"answer": 27}) == {"accuracy": 1.0, "answered": 1.0, "style": 1.0}
    assert scorer("3 × 9 = 27 #### 27", {"answer": "27"}) == {"accuracy": 1.0, "answered": 1.0, "style": 0.0}
    assert FinalNumberScorer()("nothing", {"answer": 27}) == {"accuracy": 0.0, "answered": 0.0}
    with pytest.raises(KeyError, match="'answer'"):
        scorer("27", {"prompt": "x"})
    with pytest.raises(ValueError, match="must be a number"):
        scorer("27", {"answer": "many"})
    with pytest.raises(ValueError, match="style_pattern"):
        FinalNumberScorer(style_pattern="(")


WANT = {"name": "set_timer", "arguments": {"minutes": 25, "label": "pasta"}}


@pytest.mark.parametrize(
    "output, accuracy, name, parsed",
    [
        ('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 25, "label": "pasta"}}\n</tool_call>', 1, 1, 1),
        ('Sure! <tool_call>{"name": "set_timer", "arguments": {"label": "Pasta", "minutes": 25.0}}</tool_call> Done.', 1, 1, 1),
        ('{"name": "set_timer", "parameters": {"minutes": 25, "label": "pasta"}}', 1, 1, 1),  # bare JSON, "parameters"
        ('{"type": "function", "function": {"name": "set_timer", "arguments": "{\\"minutes\\": 25, \\"label\\": \\"pasta\\"}"}}', 1, 1, 1),
        ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 25, "label": "pasta"}}', 1, 1, 1),  # unclosed at the end
        ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 20, "label": "pasta"}}</tool_call>', 0, 1, 1),
        ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 25}}</tool_call>', 0, 1, 1),  # a missing argument
        ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 25, "label": "pasta", "sound": "bell"}}</tool_call>', 0, 1, 1),
        ('<tool_call>{"name": "set_timer", "arguments": {"minutes": "25", "label": "pasta"}}</tool_call>', 0, 1, 1),  # a string is not a number
        ('<tool_call>{"name": "start_timer", "arguments": {"minutes": 25, "label": "pasta"}}</tool_call>', 0, 0, 1),
        ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 25, "label": "pasta"</tool_call>', 0, 0, 0),  # broken JSON
        ("I will set a timer for 25 minutes for the pasta.", 0, 0, 0),
    ],
)
def test_the_tool_call_scorer(output, accuracy, name, parsed):
    assert ToolCallScorer()(normalise(output), {"call": WANT}) == {"accuracy": accuracy, "name": name, "parsed": parsed}


def test_argument_comparison_and_tool_call_style():
    assert same_arguments({"a": [1, "X"], "b": {"c": 2.0}}, {"b": {"c": 2}, "a": [1, "x"]})
    assert not same_arguments({"a": [1, 2]}, {"a": [2, 1]})  # lists keep their order
    assert not same_arguments({"a": True}, {"a": 1})
    scorer = ToolCallScorer(style_pattern=TOOL_STYLE)
    block = normalise('<tool_call>\n{"name": "set_timer", "arguments": {"minutes": 25, "label": "pasta"}}\n</tool_call>')
    assert scorer(block, {"call": WANT})["style"] == 1.0
    assert scorer("Here you go: " + block, {"call": WANT}) == {"accuracy": 1.0, "name": 1.0, "parsed": 1.0, "style": 0.0}
    with pytest.raises(KeyError, match="'call'"):
        scorer(block, {"answer": 3})


# ---- the generation task with a scorer ------------------------------------------------------------


class RecordingModel(ScriptedModel):
    """A scripted model that also keeps the prompts it was given, decoded."""

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.prompts = [self.tok.decode(row[mask.bool()]) for row, mask in zip(input_ids, attention_mask)]
        return super().generate(input_ids, attention_mask, max_new_tokens, **kwargs)


def test_generation_task_averages_the_scorers_metrics_and_sends_the_system_prompt(char_tokenizer):
    items = [{"prompt": "2 + 3?", "answer": 5, "system": "Be brief."}, {"prompt": "4 + 4?", "answer": 8}]
    model = RecordingModel(char_tokenizer, ["#### 5<|im_end|>", "The answer is 9."])
    task = GenerationTask("sums", items, max_new_tokens=20, scorer=FinalNumberScorer())
    assert task.evaluate(model, char_tokenizer, batch_size=2) == {"accuracy": 0.5, "answered": 1.0}
    assert model.prompts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 3?")
    assert model.prompts[1].startswith("<|im_start|>user\n4 + 4?")
    with pytest.raises(ValueError, match="1 outputs for 2 items"):
        task.score(["5"])


def test_generation_task_keeps_exact_and_content_by_default():
    items = [{"prompt": "p", "references": ["it is red ."], "answer": "red", "distractors": ["blue"]}]
    assert GenerationTask("colour", items).score(["it is red ."]) == {"exact": 1.0, "content": 1.0}
    assert GenerationTask("colour", items).score(["red it is ."]) == {"exact": 0.0, "content": 1.0}


def test_a_task_without_items_or_with_uneven_metrics_is_refused():
    with pytest.raises(ValueError, match="GenerationTask 'empty': no items"):
        GenerationTask("empty", [])
    uneven = GenerationTask("uneven", [{"prompt": "a"}, {"prompt": "b"}], scorer=lambda out, item: {"x": 1.0} if item["prompt"] == "a" else {})
    with pytest.raises(ValueError, match=r"task 'uneven': the scorer gave metrics \[\] for item 1 but \['x'\]"):
        uneven.score(["1", "2"])
