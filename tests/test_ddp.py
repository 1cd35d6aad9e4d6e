"""Step-level token normalisation across ranks, through a real `fit`: 2 CPU processes (DDP, gloo)
with very different token counts per rank log the same step loss, see the same gradients and end
with the same weights after 2 optimizer steps as one process holding each whole global batch."""

import pytest
import torch

from scale_fit import STEPS, recorded_fit, write_records


def assert_records_equal(got, want, *, grads=True):
    """Same logged loss/ce/tokens at every step, same gradients at every step, same final weights."""
    assert len(got["logged"]) == len(want["logged"]) == STEPS
    for step, (a, b) in enumerate(zip(got["logged"], want["logged"]), start=1):
        assert a == pytest.approx(b, rel=1e-5), f"logged metrics of step {step}"
    if grads:
        assert len(got["grads"]) == len(want["grads"]) == STEPS
        for a, b in zip(got["grads"], want["grads"]):
            assert a.keys() == b.keys() and a
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)
    assert got["params"].keys() == want["params"].keys() and got["params"]
    for name in got["params"]:
        torch.testing.assert_close(got["params"][name], want["params"][name], rtol=1e-4, atol=1e-6, msg=name)


def max_gap(a, b):
    """The largest absolute difference between two state dicts with the same keys."""
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokenizer_dir):
    """The reference: one process, each optimizer step one micro-batch of four examples."""
    tmp = tmp_path_factory.mktemp("single")
    return recorded_fit(tmp / "single.pt", tokenizer_dir, write_records(tmp / "train.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "normalization, micro_batch, accumulate, chunk_size",
    # One micro-batch per rank and step; two with accumulation, through the chunked loss; per-rank means.
    [("step", 2, 1, None), ("step", 1, 2, 5), ("micro_batch", 2, 1, None)],
)
def test_two_ranks_equal_one_process(tmp_path, tokenizer_dir, single, normalization, micro_batch, accumulate, chunk_size):
    ddp = recorded_fit(
        tmp_path / "ddp.pt",
        tokenizer_dir,
        write_records(tmp_path / "train.jsonl"),
        devices=2,
        strategy="ddp_spawn",
        micro_batch=micro_batch,
        accumulate=accumulate,
        normalization=normalization,
        chunk_size=chunk_size,
    )
    # The weights moved well beyond the tolerance, so equal final weights say the updates were equal.
    assert max_gap(single["params"], single["initial"]) > 1e-3
    if normalization == "step":
        assert_records_equal(ddp, single)
        return
    # Per-rank means over-weight the short answers: the first step's logged loss is the same (same
    # weights, same tokens) but its gradients are not, and neither are the weights after it.
    assert ddp["logged"][0] == pytest.approx(single["logged"][0], rel=1e-5)
    first_ddp, first_single = ddp["grads"][0], single["grads"][0]
    assert not all(torch.allclose(first_ddp[n], first_single[n], rtol=1e-4, atol=1e-7) for n in first_single)
    assert max_gap(ddp["params"], single["params"]) > 1e-4
