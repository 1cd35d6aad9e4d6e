"""The conflict cohort callback against a direct computation on a tiny run, and the module's reference
wiring (cache vs frozen copy, the KL baselines' refusals) in real Trainer runs."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger

from conftest import TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.evaluation.cohort import ConflictCohortCallback, cohort_means, tied_quantile_threshold
from eaft_pl.data.chat import collate
from eaft_pl.loss.gates import EAFTGate, SFTGate
from eaft_pl.loss.stats import token_statistics
from eaft_pl.loss.reference_gates import StaticEAFTGate

RECORDS = [{"prompt": f"q{i}", "response": "the answer is " + "xyz"[i % 3] * (1 + i % 4)} for i in range(8)]


def make_data(tmp_path, tokenizer_dir):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return ChatJsonlDataModule(train_file=str(path), val_file=str(path), tokenizer_name_or_path=str(tokenizer_dir), batch_size=4)


def trainer(tmp_path, callbacks=(), steps=3, logger=False):
    return pl.Trainer(
        max_steps=steps, logger=logger, callbacks=list(callbacks), accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path),
    )  # fmt: skip


def test_tied_quantile_threshold_takes_every_tie_at_zero():
    x = torch.tensor([0.0] * 6 + [0.0005, 0.3, 0.5, 0.9])
    assert tied_quantile_threshold(x, 0.15, 0.0) == 0.0  # the plain 2nd smallest value
    t = tied_quantile_threshold(x, 0.15, 0.001)
    assert t == 0.001 and int((x <= t).sum()) == 7  # all ties near 0 together: 70% of the tokens
    assert tied_quantile_threshold(x, 0.9, 0.001) == 0.5


def test_cohort_means_match_direct_means():
    conflict = torch.tensor([True, False, True, False, False])
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    out = cohort_means(conflict, {"x": v})
    assert out == {"cohort/conflict/tokens": 2.0, "cohort/conflict/x": 2.0, "cohort/rest/tokens": 3.0, "cohort/rest/x": 4.0}
    assert math.isnan(cohort_means(torch.zeros(2, dtype=torch.bool), {"x": v[:2]})["cohort/conflict/x"])


def test_cohort_curves_equal_a_direct_computation_on_a_tiny_run(tmp_path, tokenizer_dir):
    pl.seed_everything(0)
    data = make_data(tmp_path, tokenizer_dir)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=EAFTGate(), learning_rate=1e-2)
    module.configure_model()
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = ConflictCohortCallback(sample_size=100, splits=["train", "val"], every_n_steps=1, rule="quantile",
                                      entropy_quantile=0.5, prob_quantile=0.5, tie_tolerance=0.0)  # fmt: skip
    logger = MLFlowLogger(experiment_name="cohort", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer(tmp_path, [callback], steps=3, logger=logger).fit(module, datamodule=data)

    assert [r["step"] for r in callback.history] == [0, 1, 2, 3]
    examples = data.datasets["train"] + data.datasets["val"]  # sample_size covers both splits whole
    batch = collate(examples, data.pad_token_id)

    def direct(state):
        module.model.load_state_dict(state)
        module.eval()
        with torch.no_grad():
            return token_statistics(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    final = {k: v.clone() for k, v in module.model.state_dict().items()}
    s0, s1 = direct(base), direct(final)
    h_t = torch.kthvalue(s0.norm_entropy.double(), math.ceil(0.5 * s0.num_tokens)).values.item()
    p_t = torch.kthvalue(s0.label_prob.double(), math.ceil(0.5 * s0.num_tokens)).values.item()
    conflict = (s0.norm_entropy <= h_t) & (s0.label_prob <= p_t)
    assert 0 < conflict.sum() < s0.num_tokens
    for record, s in ((callback.history[0], s0), (callback.history[-1], s1)):
        still = (s.norm_entropy <= h_t) & (s.label_prob <= p_t)
        for cohort, member in (("conflict", conflict), ("rest", ~conflict)):
            assert record[f"cohort/{cohort}/tokens"] == member.sum().item()
            # EAFT's weight is the normalised entropy of the current model.
            assert record[f"cohort/{cohort}/weight"] == pytest.approx(s.norm_entropy[member].double().mean().item(), rel=1e-4)
            assert record[f"cohort/{cohort}/norm_entropy"] == pytest.approx(s.norm_entropy[member].double().mean().item(), rel=1e-4)
            assert record[f"cohort/{cohort}/label_prob"] == pytest.approx(s.label_prob[member].double().mean().item(), rel=1e-4)
            assert record[f"cohort/{cohort}/share_in_conflict"] == pytest.approx(still[member].double().mean().item(), abs=1e-9)
    assert callback.history[0]["cohort/conflict/share_in_conflict"] == 1.0
    assert callback.history[-1]["cohort/conflict/label_prob"] != callback.history[0]["cohort/conflict/label_prob"]
    curve = logger.experiment.get_metric_history(logger.run_id, "cohort/conflict/weight")
    logged = sorted((m.step, m.value) for m in curve)
    assert [step for step, _ in logged] == [r["step"] for r in callback.history]
    assert [v for _, v in logged] == pytest.approx([r["cohort/conflict/weight"] for r in callback.history])
    assert callback.seconds > 0


def test_cohort_names_a_missing_split(tmp_path, tokenizer_dir):
    data = make_data(tmp_path, tokenizer_dir)
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(ValueError, match="cohort.splits"):
        trainer(tmp_path, [ConflictCohortCallback(splits=["train", "val:general"])], steps=1).fit(module, datamodule=data)


def test_static_gate_trains_the_same_from_the_cache_and_from_a_frozen_copy(tmp_path, tokenizer_dir):
    finals = []
    for source in ("cache", "frozen"):
        pl.seed_everything(0)
        module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=StaticEAFTGate(),
                            reference_source=source, reference_cache_dir=str(tmp_path / "cache"), learning_rate=1e-2)  # fmt: skip
        trainer(tmp_path, steps=2).fit(module, datamodule=make_data(tmp_path, tokenizer_dir))
        assert module.reference_seconds is not None
        finals.append({k: v.clone() for k, v in module.model.state_dict().items()})
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=1e-4, atol=1e-6)


def test_kl_baselines_refuse_what_they_cannot_do(tokenizer_dir):
    common = {"model_config": TINY_LLAMA, "tokenizer_name_or_path": str(tokenizer_dir), "gate": SFTGate()}
    with pytest.raises(ValueError, match="chunk_size"):
        EAFTModule(**common, reference_kl_coef=0.5, reference_source="frozen", chunk_size=8)
    with pytest.raises(ValueError, match="reference_source: frozen"):
        EAFTModule(**common, reference_kl_coef=0.5)
    with pytest.raises(ValueError, match="reference_kl_direction"):
        EAFTModule(**common, reference_kl_coef=0.5, reference_source="frozen", reference_kl_direction="up")


def test_sft_kl_step_adds_beta_times_the_mean_kl(tmp_path, tokenizer_dir):
    pl.seed_everything(0)
    data = make_data(tmp_path, tokenizer_dir)
    data.setup("fit")
    module = EAFTModule(model_config=TINY_LLAMA, tokenizer_name_or_path=str(tokenizer_dir), gate=SFTGate(),
                        reference_source="frozen", reference_kl_coef=0.5)  # fmt: skip
    module.configure_model()
    batch = collate(data.datasets["train"][:4], data.pad_token_id)
    with torch.no_grad():  # move the trained copy away from the frozen one, so the KL is not 0
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats, weights, total = module.token_stats(batch)
    logits = module(batch["input_ids"], batch["attention_mask"])
    ref_logits = module._frozen[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1][shift != -100], -1)
    logq = torch.log_softmax(ref_logits[:, :-1][shift != -100], -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    assert kl.min() > 0
    expected = -logp.gather(1, shift[shift != -100].unsqueeze(1)).sum() + 0.5 * kl.sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
