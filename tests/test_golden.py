"""Golden traces: short toy runs of every method must reproduce, to float32 rounding (REL), the per-step training scalars
and dev metrics recorded before the method code was redesigned (``tests/golden/record.py`` says how to record).
Scalars logged since (e.g. ``train_grad_norm``) are new keys; every recorded key must keep its value."""

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import record  # noqa: E402


# float32 kernels differ in the last bits between CPUs (AVX2 vs AVX-512 machines give 1e-7-relative differences in
# these scalars); a changed term moves them by far more than this
REL = 1e-5


@pytest.mark.parametrize("name", list(record.TOY_RUNS))
def test_toy_run_matches_its_golden_trace(name, tiny_dropout_model_dir, tmp_path):
    expected = json.loads(record.path_of("toy", name).read_text())
    got = record.run("toy", name, tmp_path, tiny_dropout_model_dir)
    assert [e["step"] for e in got["evals"]] == list(range(1, 13))
    for want, have in zip(expected["evals"], got["evals"]):  # every recorded scalar; new ones may be added
        assert {k: have.get(k) for k in want} == pytest.approx(want, rel=REL), f"step {want['step']}"
    want = expected["final"]  # counts and accuracies exactly; the dev loss to float32 rounding
    assert got["final"] == {**want, "dev": {**want["dev"], "loss": pytest.approx(want["dev"]["loss"], rel=REL)}}


def test_golden_traces_cover_every_term_and_would_catch_a_change():
    """The traces hold the terms' own scalars (so a change in L_D or L_R shows), and a change of 10 × REL differs."""
    carl_rar = json.loads(record.path_of("toy", "carl-rar").read_text())
    last = carl_rar["evals"][-1]
    assert {"train_loss", "train_loss_D", "train_loss_R", "train_cos_R_Radv"} <= set(last)
    nudged = {**last, "train_loss_D": last["train_loss_D"] * (1 + 10 * REL)}
    assert nudged != pytest.approx(last, rel=REL)
