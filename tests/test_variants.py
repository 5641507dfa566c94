"""The variants beyond the paper and the gradient diagnostics, against hand computations."""

import json
import math

import pytest
import torch

from carlrar.diagnostics import diagnosed_backward, term_gradients
from carlrar.methods import AdversarialConfig, ContrastiveConfig, ReconstructionConfig, freelb_step
from carlrar.objectives import ContrastiveTerm, ReconstructionTerm
from carlrar.objectives.reconstruction import reconstruction_loss
from carlrar.objectives.term import balanced_weight
from carlrar.train import train
from test_freelb import model_and_batch  # noqa: F401 (fixture)
from test_train import cfg_for


class Tiny(torch.nn.Module):
    """Named like a Classifier's parameters: one per module group."""

    def __init__(self):
        super().__init__()
        self.hf = torch.nn.Module()
        self.hf.bert = torch.nn.Module()
        self.hf.bert.embeddings = torch.nn.Linear(3, 1, bias=False)
        self.hf.bert.encoder = torch.nn.Linear(4, 1, bias=False)
        self.heads = torch.nn.ModuleDict({"x": torch.nn.Linear(2, 1, bias=False)})


def test_term_gradients_by_hand():
    m = Tiny()
    e, h = m.hf.bert.embeddings.weight, m.heads["x"].weight
    losses = {"C": e.sum() + 2 * h.sum(), "D": -e.sum() + 2 * h.sum()}  # ∇C = (1,1,1 | 0 | 2,2), ∇D = (−1.. | 0 | 2,2)
    logs = term_gradients(m, losses)
    assert logs["grad_C"] == pytest.approx(math.sqrt(3 + 8)) and logs["grad_C_embeddings"] == pytest.approx(3 ** 0.5)
    assert logs["grad_C_encoder"] == 0 and logs["grad_D_top"] == pytest.approx(8 ** 0.5)
    assert logs["cos_C_D"] == pytest.approx((-3 + 8) / 11) and logs["cos_C_D_embeddings"] == pytest.approx(-1)
    assert logs["cos_C_D_top"] == pytest.approx(1)


def three_losses(m):
    e, x, h = m.hf.bert.embeddings.weight, m.hf.bert.encoder.weight, m.heads["x"].weight
    return {"C": e.sum() + 2 * h.sum(), "D": -e.sum() + (x ** 2).sum(), "R": (e ** 3).sum() + 3 * h.sum()}


@pytest.mark.parametrize("unnamed", [0.0, 3.0])  # 3: a term adds to the pass loss without naming its raw loss
def test_diagnosed_backward_derives_the_last_terms_gradient_and_accumulates_as_the_backward_alone(unnamed):
    """C, D separately, R as the pass's own gradient minus theirs; under a backward that scales (fp16's loss
    scale) and on top of earlier passes' gradients, which must end as a plain backward leaves them, bit for bit."""
    torch.manual_seed(0)
    m, weights, scale = Tiny(), {"C": 0.5, "D": 1.0, "R": 0.05}, 0.5
    for p in m.parameters():
        p.data.normal_()
    reference = Tiny()
    reference.load_state_dict(m.state_dict())
    for model in (m, reference):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.3)  # what earlier passes accumulated

    def total(losses, model):
        return (sum(weights[k] * v for k, v in losses.items()) + unnamed * model.heads["x"].weight.sum()) * scale

    expected = term_gradients(m, three_losses(m))
    losses = three_losses(m)
    logs = diagnosed_backward(m, losses, weights, total(losses, m), scale, lambda loss: (4 * loss).backward())
    (4 * total(three_losses(reference), reference)).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(m.parameters(), reference.parameters()))
    assert logs.keys() == expected.keys()
    for k, v in expected.items():
        assert logs[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert logs["grad_R_embeddings"] > 0 and logs["cos_C_R"] != pytest.approx(logs["cos_C_D"])


def test_diagnosed_freelb_step_trains_exactly_as_an_undiagnosed_one(model_and_batch):  # noqa: F811
    model, batch = model_and_batch
    adv = AdversarialConfig(adv_steps=2, adv_init_mag=0.1)
    term = ReconstructionTerm(ReconstructionConfig(), adv, model)  # adds its head to the model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for diagnose in (False, True):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        logs = freelb_step(model, batch, lambda loss: loss.backward(), adv, (term,), scale=0.5, diagnose=diagnose)
        results.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logs))
    (plain, _), (diagnosed, logs) = results
    assert plain.keys() == diagnosed.keys() and all(torch.equal(plain[n], diagnosed[n]) for n in plain)
    assert {"diag/grad_C", "diag/grad_R", "diag/cos_C_R"} <= logs.keys() and logs["diag/grad_R"] > 0


def test_balanced_weight_scales_a_dominant_term_down_to_the_ratio():
    w = torch.nn.Parameter(torch.ones(4))
    model = torch.nn.Module()
    model.w = w
    loss_C, loss_D = 2 * w.sum(), 10 * w.sum()  # gradient norms 4 and 20
    assert balanced_weight(model, loss_C, loss_D, ratio=1.0, cap=1.0) == pytest.approx(0.2)
    assert balanced_weight(model, loss_C, loss_D, ratio=0.5, cap=1.0) == pytest.approx(0.1)
    assert balanced_weight(model, loss_C, loss_D, ratio=10.0, cap=1.0) == 1.0  # never above the paper's weight
    (loss_C + loss_D).backward()  # the graph was kept for the training backward
    assert w.grad.tolist() == [12.0] * 4


def test_rar_ascent_on_classification_only_gives_freelbs_delta(model_and_batch):  # noqa: F811
    model, batch = model_and_batch
    seen = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: seen.append(kw.get("delta")) or real_forward(*a, **kw)
    adv = AdversarialConfig(adv_steps=2, adv_init_mag=0.0, adv_lr=0.5)
    freelb_step(model, batch, lambda loss: loss.backward(), adv)
    plain = seen[1].clone()
    seen.clear()
    term = ReconstructionTerm(ReconstructionConfig(rar_weight=5.0, rar_ascent="classification"), adv, model)
    freelb_step(model, batch, lambda loss: loss.backward(), adv, (term,))
    assert torch.allclose(seen[1], plain, atol=1e-6)  # L_R took no part in δ's step
    seen.clear()
    term = ReconstructionTerm(ReconstructionConfig(rar_weight=5.0), adv, model)
    freelb_step(model, batch, lambda loss: loss.backward(), adv, (term,))
    assert not torch.allclose(seen[1], plain, atol=1e-4)  # the paper's FreeLB pass loss: it did


def test_plateau_rule_starts_after_patience_evaluations(tiny_model_dir):
    from carlrar.models import load_classifier

    model = load_classifier(str(tiny_model_dir), ["0", "1"])
    term = ContrastiveTerm(ContrastiveConfig(carl_start_rule="plateau", carl_plateau_patience=2, carl_negatives=2),
                           AdversarialConfig(), model, train_labels=[0, 1] * 4, total_steps=100)
    assert term.start_step == 101 and term.select_after_step == 101
    for step, acc in ((10, 0.5), (20, 0.6), (30, 0.6), (40, 0.58)):
        term.after_evaluate(step, acc)
        assert term.start_step == (40 if step == 40 else 101)
    state = term.state_tensors()
    assert int(state["start_step"]) == 40
    twin = ContrastiveTerm(term.config, AdversarialConfig(), model, train_labels=[0, 1] * 4, total_steps=100)
    twin.load_state_tensors(state)
    assert twin.start_step == 40 and twin.plateau == [0.6, 2]


def test_reconstructor_warm_up_fits_the_head_only_and_keeps_the_rng(tiny_model_dir, toy_files):
    from transformers import AutoTokenizer

    from carlrar.data import Collator, EncodedSplit, load_files
    from carlrar.models import load_classifier

    ds = load_files(str(toy_files["train"]), str(toy_files["dev"]), text_column="sentence")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data, collate = EncodedSplit(ds.splits["train"], tok, 32), Collator(tok.pad_token_id)
    model = load_classifier(str(tiny_model_dir), ds.label_names)
    config = ReconstructionConfig(rar_warmup_steps=30, rar_warmup_lr=1e-2)
    term = ReconstructionTerm(config, AdversarialConfig(), model)
    b = collate([data[i] for i in range(16)])

    def l_r():
        with torch.no_grad():
            return reconstruction_loss(term.head(model(b["input_ids"], b["attention_mask"]).token_states),
                                       b["input_ids"], b["attention_mask"]).item()

    before, encoder = l_r(), {k: v.clone() for k, v in model.hf.state_dict().items()}
    rng = torch.get_rng_state()
    assert term.before_step(0, model, data, collate, 16) and not term.before_step(1, model, data, collate, 16)
    assert l_r() < before - 1.0  # measured here: 10.4 → 5.6
    assert all(torch.equal(v, model.hf.state_dict()[k]) for k, v in encoder.items())  # encoder (and tied E) frozen
    assert model.word_embeddings.weight.requires_grad  # frozen for the warm-up only
    assert torch.equal(rng, torch.get_rng_state())


def test_diagnostics_are_logged_every_k_steps_with_each_terms_gradient(tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "carl"
    train(cfg_for(tiny_model_dir, toy_files, out, method="carl", max_steps=6, diagnostics_steps=2),
          AdversarialConfig(), ContrastiveConfig(carl_start_step=3, carl_negatives=8, carl_weight_ratio=0.5))
    records = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert "grad_D" not in records[0] and {"grad_C", "grad_D", "cos_C_D", "cos_C_D_encoder"} <= set(records[2])
    assert all(0 < r["clip_factor"] <= 1 and math.isfinite(r["grad_norm"]) for r in records)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = [m for m in metrics if "train_carl_weight" in m]
    assert later and all(0 < m["train_carl_weight"] <= 1.0 for m in later)
    assert all(0 <= m["train_neg_above_pos"] <= 1 for m in later)


def test_plateau_start_in_a_run_fills_the_banks_after_the_stall(tiny_model_dir, toy_files, tmp_path):
    out = tmp_path / "plateau"
    train(cfg_for(tiny_model_dir, toy_files, out, method="carl", max_steps=8, eval_steps=2, lr=1e-5),
          AdversarialConfig(), ContrastiveConfig(carl_start_rule="plateau", carl_plateau_patience=1, carl_negatives=8))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    started = [r["step"] for r in records if "train_loss_D" in r]
    stalled = next(r["step"] for a, r in zip(records, records[1:]) if r["dev_accuracy"] <= a["dev_accuracy"])
    assert started and started[0] == stalled + 2  # L_D from the first step after the stall was seen
