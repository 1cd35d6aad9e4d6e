"""The general suites of the real-model experiment and the task types they use: the instruction
checkers on hand-made answers, plain-text perplexity, multiple choice, greedy answers and the
agreement/KL task against direct computations on a tiny model built from a config."""

import copy
import math

import pytest
import torch

from conftest import TINY_LLAMA
from eaft_pl.evaluation.agreement import BaseAgreementTask, forward_kl
from eaft_pl.evaluation.forgetting import forgetting
from eaft_pl.evaluation.instructions import Constraint, InstructionItem, InstructionTask, check, prompt_with_constraints
from eaft_pl.evaluation.tasks import TextPerplexityTask, chat_prompt_ids, decode_answer, greedy_answers
from eaft_pl.experiments.realmodel.general_data import CATEGORY_ANSWERS, FACTS, GENERAL_PROMPTS
from eaft_pl.experiments.realmodel.general_suites import (
    CANDIDATES,
    KEPT,
    candidate_tasks,
    fact_items,
    general_suites,
    instruction_items,
    prose_passages,
)


@pytest.fixture(scope="module")
def tiny(char_tokenizer):
    from eaft_pl.models.loading import build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm(TINY_LLAMA, char_tokenizer).eval()


# ---- the instruction checkers --------------------------------------------------------------------

CASES = [  # (kind, value, passing answers, failing answers)
    ("lowercase", None, ["the sea is calm.", "rain, rain: 3 days"], ["The sea is calm.", "the sea is CALM", "123 !", ""]),
    ("max_words", 5, ["Short and sweet.", "one two three four five"], ["one two three four five six", "", "..."]),
    ("min_words", 3, ["one two three", "It's a long one indeed."], ["two words", ""]),
    ("keyword", "river", ["A River runs.", "by the river."], ["Rivers run.", "a riverbank", "no such word"]),
    ("json_keys", ("topic", "summary"), ['{"topic": "sea", "summary": "wet"}', '```json\n{"summary": 1, "topic": 2, "x": 3}\n```'],
     ['{"topic": "sea"}', '{"topic": "sea" "summary": "wet"}', '["topic", "summary"]', 'Sure: {"topic": 1, "summary": 2}']),
    ("ends_with", "That is all", ["The sea is big. That is all", "The sea.\nThat is all  \n"], ["That is all.", "that is all", "That is all folks"]),
    ("starts_with", "Yes", ["Yes, it is.", "yes: the sea", '"Yes" I said'], ["Yesterday it rained.", "Well, yes.", ""]),
    ("bullets", 2, ["- one\n- two", "Here:\n* one\n  - two\nDone."], ["- one\n- two\n- three", "- one - two", "1. one\n2. two", "-one\n-two"]),
    ("no_commas", None, ["No commas here.", "a; b: c"], ["a, b", ""]),
]


@pytest.mark.parametrize("kind,value,passing,failing", CASES, ids=[c[0] for c in CASES])
def test_each_checker_passes_and_fails_hand_made_answers(kind, value, passing, failing):
    constraint = Constraint(kind, value)
    assert [check(constraint, text) for text in passing] == [True] * len(passing)
    assert [check(constraint, text) for text in failing] == [False] * len(failing)


def test_every_constraint_kind_has_a_case_and_unknown_kinds_are_refused():
    from eaft_pl.evaluation.instructions import CHECKS

    assert {c[0] for c in CASES} == set(CHECKS)
    with pytest.raises(ValueError, match="unknown constraint kind 'shout'"):
        Constraint("shout")
    for kind, bad in [("max_words", "10"), ("bullets", 0), ("keyword", " "), ("json_keys", []), ("lowercase", True)]:
        with pytest.raises(ValueError, match=f"constraint '{kind}' needs"):
            Constraint(kind, bad)
    with pytest.raises(ValueError, match="no constraints"):
        InstructionItem("Describe the sea.", ())


def test_instruction_scores_count_prompts_and_constraints():
    items = [
        InstructionItem("Describe rain.", (Constraint("lowercase"), Constraint("max_words", 3))),
        InstructionItem("Describe snow.", (Constraint("keyword", "white"),)),
    ]
    task = InstructionTask("i", items)
    # Item 1 meets one of its two constraints, item 2 its only one: 1 of 2 prompts, 2 of 3 constraints.
    assert task.score(["wet and cold rain", "Snow is white."]) == pytest.approx({"prompt_acc": 0.5, "constraint_acc": 2 / 3})
    assert task.score(["wet rain", "Snow is white."]) == {"prompt_acc": 1.0, "constraint_acc": 1.0}
    with pytest.raises(ValueError, match="1 answers for 2 items"):
        task.score(["x"])
    # The prompt appends one sentence per constraint; the control asks the bare request.
    assert task.prompts()[0] == prompt_with_constraints(items[0])
    assert task.prompts()[0].startswith("Describe rain. Write your whole answer in lowercase") and "at most 3 words" in task.prompts()[0]
    control = InstructionTask("c", items, with_constraints=False)
    assert control.prompts() == ["Describe rain.", "Describe snow."]


# ---- generation, perplexity and multiple choice on a tiny model ---------------------------------


def _argmax_decode(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding written out: one full forward pass per new token, no cache, no padding."""
    ids = chat_prompt_ids(tokenizer, prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
    return out


def test_batched_greedy_answers_match_token_by_token_decoding(tiny, char_tokenizer):
    prompts = ["hi", "what is the sea?", "a much longer prompt, so the others are padded"]
    got = greedy_answers(tiny, char_tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert got == [_argmax_decode(tiny, char_tokenizer, p, 6) for p in prompts]
    assert decode_answer(char_tokenizer, got[0] + [char_tokenizer.eos_token_id]) == decode_answer(char_tokenizer, got[0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answers(tiny, char_tokenizer, prompts, max_new_tokens=0)


def test_text_perplexity_matches_a_direct_computation(tiny, char_tokenizer):
    texts = ["The sea is calm today.", "Rain.", "A longer text that the task cuts to its first tokens."]
    got = TextPerplexityTask("prose", texts, max_length=20).evaluate(tiny, char_tokenizer, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = char_tokenizer(text, add_special_tokens=False)["input_ids"][:20]
            logp = torch.log_softmax(tiny(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            total -= sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))
            count += len(ids) - 1
    assert got["ce"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="no texts"):
        TextPerplexityTask("prose", [])


def test_fact_multiple_choice_matches_a_direct_computation(tiny, char_tokenizer):
    items = fact_items(6, seed=3)
    task = candidate_tasks(seed=3, n_facts=6)["facts"]
    assert task.items == items

    def loglik(prompt, choice):
        p = chat_prompt_ids(char_tokenizer, prompt)
        c = char_tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny(input_ids=torch.tensor([p + c])).logits[0], -1)
        return sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))

    picks = [max(range(len(it["choices"])), key=lambda j: loglik(it["prompt"], it["choices"][j])) for it in items]
    expected = sum(p == it["label"] for p, it in zip(picks, items)) / len(items)
    assert task.evaluate(tiny, char_tokenizer, batch_size=5)["acc"] == pytest.approx(expected)


# ---- agreement with the base and the KL to it ------------------------------------------------------


def _direct_kl(base_model, model, tokenizer, prompts, answers):
    """Token-mean KL(base || model) on the answers, each model run alone on each prompt + answer."""
    kls = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            p = chat_prompt_ids(tokenizer, prompt)
            ids = torch.tensor([p + answer])
            rows = slice(len(p) - 1, len(p) + len(answer) - 1)
            lb = torch.log_softmax(base_model(input_ids=ids).logits[0, rows].double(), -1)
            lc = torch.log_softmax(model(input_ids=ids).logits[0, rows].double(), -1)
            kls += (lb.exp() * (lb - lc)).sum(-1).tolist()
    return sum(kls) / len(kls)


def test_agreement_is_one_and_kl_zero_on_an_unchanged_model(tiny, char_tokenizer):
    prompts = ["hi", "why is the sky blue?", "name a cat"]
    task = BaseAgreementTask("agreement", prompts, max_new_tokens=5)
    first = task.evaluate(tiny, char_tokenizer, batch_size=2)
    assert task.base.answers == [_argmax_decode(tiny, char_tokenizer, p, 5) for p in prompts]
    again = task.evaluate(tiny, char_tokenizer, batch_size=2)  # scored against the record, not assumed
    for scores in (first, again):
        assert scores["agree"] == 1.0 and scores["token_agree"] == 1.0
        assert scores["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("top_k", [None, 7])
def test_kl_to_the_base_after_perturbing_the_weights_matches_a_direct_computation(tiny, char_tokenizer, top_k):
    prompts = ["hi", "why is the sky blue?", "name a cat"]
    task = BaseAgreementTask("agreement", prompts, max_new_tokens=5, top_k=top_k)
    task.evaluate(tiny, char_tokenizer, batch_size=3)
    changed = copy.deepcopy(tiny)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in changed.parameters():
            param.add_(0.3 * torch.randn_like(param) * param.std())
    scores = task.evaluate(changed, char_tokenizer, batch_size=3)
    full = _direct_kl(tiny, changed, char_tokenizer, prompts, task.base.answers)
    assert full > 1e-3
    if top_k is None:
        assert scores["kl"] == pytest.approx(full, rel=1e-4)
    else:  # the top-K coarsening never exceeds the full KL
        assert 0 < scores["kl"] <= full + 1e-6
    now = [_argmax_decode(changed, char_tokenizer, p, 5) for p in prompts]
    assert scores["agree"] == pytest.approx(sum(a == b for a, b in zip(now, task.base.answers)) / 3)
    # KL grows as the model drifts: the forgetting callback counts that as forgetting.
    assert forgetting(0.0, scores["kl"], "kl") == pytest.approx(scores["kl"])
    task.reset()
    assert task.evaluate(changed, char_tokenizer)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_of_the_top_k_bins_against_a_hand_computation():
    base = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    current = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    full = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 2 * 0.1 * math.log(0.4)
    assert forward_kl(base, current).item() == pytest.approx(full, rel=1e-5)
    values, indices = base.topk(2, dim=-1)
    # Bins {0}, {1}, {2, 3}: base (0.5, 0.3, 0.2), current (0.25, 0.25, 0.5).
    coarse = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    assert forward_kl(values, current, indices).item() == pytest.approx(coarse, rel=1e-5)
    assert coarse <= full
    values, indices = base.topk(4, dim=-1)  # every token kept: the rest bin is empty
    assert forward_kl(values, current, indices).item() == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        forward_kl(base, current[:, :3])


# ---- the suites --------------------------------------------------------------------------------


def test_suites_are_deterministic_per_seed():
    def contents(seed):
        tasks = candidate_tasks(seed=seed)
        return (tasks["prose"].texts, tasks["facts"].items, tasks["instructions"].prompts(), tasks["agreement"].prompts)

    assert contents(0) == contents(0)
    assert all(a != b for a, b in zip(contents(0), contents(1)))
    suites = general_suites(seed=0)
    assert list(suites) == ["general"] and [t.name for t in suites["general"]] == list(KEPT)
    assert [t.name for t in general_suites(include=CANDIDATES, suite="g")["g"]] == list(CANDIDATES)


def test_fact_items_have_same_category_distractors_and_the_right_label():
    items = fact_items(len(FACTS), seed=0)
    by_prompt = {f"{f.question} Reply with the answer only.": f for f in FACTS}
    assert sorted(it["prompt"] for it in items) == sorted(by_prompt)  # every fact once
    for item in items:
        fact = by_prompt[item["prompt"]]
        assert item["choices"][item["label"]] == fact.answer
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert set(item["choices"]) <= set(CATEGORY_ANSWERS[fact.category]) | set(fact.lures)
        assert set(fact.lures[:3]) <= set(item["choices"])
    # Round robin: the first few items already cover every category.
    categories = {f.category for f in FACTS}
    assert {by_prompt[it["prompt"]].category for it in items[: len(categories)]} == categories


def test_instruction_items_rotate_the_constraint_kinds():
    items = instruction_items(18, seed=0)
    kinds = [item.constraints[0].kind for item in items]
    assert kinds[:9] == kinds[9:] and len(set(kinds)) == 9


def test_bad_sizes_and_names_get_clear_errors():
    with pytest.raises(ValueError, match=r"n must be in \[1, "):
        fact_items(0)
    with pytest.raises(ValueError, match=r"n must be in \[1, "):
        prose_passages(10**6)
    with pytest.raises(ValueError, match="unknown constraint kinds"):
        instruction_items(3, kinds=["shout"])
    with pytest.raises(ValueError, match="n_agreement"):
        candidate_tasks(n_agreement=len(GENERAL_PROMPTS) + 1)
    with pytest.raises(ValueError, match="include must name"):
        general_suites(include=["mmlu"])
    with pytest.raises(ValueError, match="top_k"):
        BaseAgreementTask("a", ["hi"], top_k=0)


# ---- in a fit, through the forgetting callback ----------------------------------------------------


def test_the_forgetting_callback_takes_the_agreement_base_at_step_zero(tmp_path, tokenizer_dir):
    import lightning.pytorch as pl

    from eaft_pl import EAFTModule
    from eaft_pl.evaluation.forgetting import ForgettingCallback
    from scale_fit import InOrderData, write_records

    class Data(InOrderData):
        def evaluation_suites(self):
            return general_suites(include=["agreement"], n_agreement=2, agreement_tokens=4) | {
                "domain": [TextPerplexityTask("d", ["the sea is calm"])]
            }

    class Snapshot(pl.Callback):  # the model as the callback's first evaluation sees it
        def on_train_start(self, trainer, pl_module):
            self.base = copy.deepcopy(pl_module.model).eval()

    pl.seed_everything(0)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), learning_rate=3e-2)
    data = Data(train_file=str(write_records(tmp_path / "train.jsonl")), tokenizer_name_or_path=str(tokenizer_dir), batch_size=4)
    snapshot, forgetting_cb = Snapshot(), ForgettingCallback(every_n_steps=1, batch_size=2)
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", callbacks=[snapshot, forgetting_cb],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)

    history = forgetting_cb.history
    assert [h["step"] for h in history] == [0, 1, 2]
    assert history[0]["scores"]["general"]["agreement"] == {"agree": 1.0, "token_agree": 1.0, "kl": 0.0}
    (task,) = forgetting_cb._suites["general"]
    assert len(set(task.prompts)) == 2 and set(task.prompts) <= set(GENERAL_PROMPTS)
    tok = module.tokenizer
    assert task.base.answers == [_argmax_decode(snapshot.base, tok, p, 4) for p in task.prompts]
    final = history[-1]["scores"]["general"]["agreement"]
    model = module.model.eval()
    assert final["kl"] > 0
    assert final["kl"] == pytest.approx(_direct_kl(snapshot.base, model, tok, task.prompts, task.base.answers), rel=1e-4)

