"""FreeLB / PGD / FGM steps and the k-PGD attack on a tiny model, checked against passes recomputed by hand."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from carlrar.attack import attack_split
from carlrar.config import TrainConfig
from carlrar.data import EncodedSplit, Split
from carlrar.methods import AdversarialConfig, base_step, fgm_step, freelb_step, pgd_step
from carlrar.models import load_classifier, load_trained
from carlrar.train import train
from conftest import NEGATIVE, POSITIVE


@pytest.fixture
def model_and_batch(tiny_model_dir):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = load_classifier(str(tiny_model_dir), ["neg", "pos"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok(["a wonderful film", "awful", "i hated it , truly"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([1, 0, 0])}
    return model, batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_freelb_one_pass_zero_init_equals_plain_step(model_and_batch):
    model, batch = model_and_batch
    twin = copy.deepcopy(model)
    base_step(model, batch, lambda loss: loss.backward())
    freelb_step(twin, batch, lambda loss: loss.backward(), AdversarialConfig(adv_steps=1, adv_init_mag=0.0))
    a, b = grads(model), grads(twin)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_freelb_accumulates_mean_of_per_pass_gradients(model_and_batch, eps):
    model, batch = model_and_batch
    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n, gamma, alpha = 3, 0.5, 0.3
    torch.manual_seed(1)
    freelb_step(model, batch, lambda loss: loss.backward(),
                AdversarialConfig(adv_steps=n, adv_init_mag=gamma, adv_lr=alpha, adv_max_norm=eps))
    got = grads(model)

    # By hand: the same init draw, then each pass on a fresh copy of the (unchanged) parameters.
    torch.manual_seed(1)
    m = mask.unsqueeze(2).float()
    lengths = mask.sum(1).float()
    delta = (torch.rand(*ids.shape, 32) * 2 - 1) * m * (gamma / torch.sqrt(lengths * 32)).view(-1, 1, 1)
    expected = {}
    for t in range(n):
        clone = copy.deepcopy(model)
        clone.zero_grad()
        delta = delta.detach().requires_grad_()
        loss = F.cross_entropy(clone(ids, mask, delta=delta).logits, y)
        loss.backward()
        for k, p in clone.named_parameters():
            if p.grad is not None:
                expected[k] = expected.get(k, 0) + p.grad / n
        g = delta.grad * m
        delta = delta + alpha * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
        if eps > 0:
            size = delta.flatten(1).norm(dim=1)
            delta = torch.where((size > eps).view(-1, 1, 1), delta * (eps / size).view(-1, 1, 1), delta)
    assert expected.keys() == got.keys()
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=1e-4), k


def test_reused_dropout_masks_make_passes_see_the_same_dropout(tiny_model_dir, model_and_batch):
    _, batch = model_and_batch
    from transformers import AutoModelForSequenceClassification

    from carlrar.models import Classifier

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, hidden_dropout_prob=0.5)
    model = Classifier(hf).train()
    seen = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: seen.append(real_forward(*a, **kw)) or seen[-1]
    cfg = AdversarialConfig(adv_steps=2, adv_init_mag=0.0, adv_lr=0.0)  # α = 0: both passes see δ = 0
    freelb_step(model, batch, lambda loss: loss.backward(), cfg)
    assert torch.equal(seen[0].logits, seen[1].logits)  # same masks → identical passes
    seen.clear()
    freelb_step(model, batch, lambda loss: loss.backward(),
                AdversarialConfig(adv_steps=2, adv_init_mag=0.0, adv_lr=0.0, adv_reuse_dropout=False))
    assert not torch.equal(seen[0].logits, seen[1].logits)  # fresh masks per pass (stock behaviour)


def test_pgd_leaves_no_gradient_from_ascent_and_fgm_adds_both_passes(model_and_batch):
    model, batch = model_and_batch
    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    cfg = AdversarialConfig(adv_steps=2, adv_init_mag=0.0, adv_lr=0.2, adv_max_norm=0.0)
    logs = pgd_step(model, batch, lambda loss: loss.backward(), cfg)
    one_pass = copy.deepcopy(model)
    one_pass.zero_grad()
    clean = F.cross_entropy(one_pass(ids, mask).logits, y)
    assert logs["loss_adv"] > clean.item()  # trained on a worse-than-clean point
    # parameter grads equal the gradient of the single adversarial loss (ascent passes left none behind)
    delta = torch.zeros(*ids.shape, 32)
    for _ in range(2):
        delta.requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(one_pass(ids, mask, delta=delta).logits, y), delta)
        g = g * mask.unsqueeze(2)
        delta = (delta + 0.2 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)).detach()
    F.cross_entropy(one_pass(ids, mask, delta=delta).logits, y).backward()
    for k, v in grads(model).items():
        assert torch.allclose(v, dict(one_pass.named_parameters())[k].grad, atol=1e-6, rtol=1e-4), k
    model.zero_grad()
    logs = fgm_step(model, batch, lambda loss: loss.backward(), cfg)
    assert logs["loss_adv"] > logs["loss_clean"]


@pytest.fixture(scope="module")
def trained_tiny(tiny_model_dir, tmp_path_factory):
    from conftest import TOY_TRAIN, write_tsv

    d = tmp_path_factory.mktemp("toy")
    write_tsv(d / "train.tsv", TOY_TRAIN)
    write_tsv(d / "dev.tsv", TOY_TRAIN[::4])
    train(TrainConfig(model=str(tiny_model_dir), train_file=str(d / "train.tsv"), dev_file=str(d / "dev.tsv"),
                      text_column="sentence", output_dir=str(d / "out"), batch_size=8, lr=5e-3, max_steps=80,
                      warmup_ratio=0.0, eval_steps=0, seed=0, group_by_length=False))
    model = load_trained(d / "out")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "out")
    texts, labels = POSITIVE + NEGATIVE, [1] * 8 + [0] * 8
    return model, tok, EncodedSplit(Split(texts, labels, "toy"), tok, 32)


def test_attack_zero_steps_is_clean_and_accuracy_falls_with_eps(trained_tiny):
    model, tok, data = trained_tiny
    clean = (model.eval()(torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in data.input_ids], True,
                                                          tok.pad_token_id),
                          torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.long)
                                                           for x in data.input_ids], True)).logits.argmax(-1))
    clean_acc = (clean == torch.tensor(data.labels)).float().mean().item()
    assert clean_acc >= 0.75  # the fixture model did learn the toy task
    zero = attack_split(model, data, tok.pad_token_id, [0.5], steps=0, progress=False)
    assert zero["clean_accuracy"] == pytest.approx(clean_acc) and zero["attacks"][0]["accuracy"] == pytest.approx(clean_acc)
    result = attack_split(model, data, tok.pad_token_id, [0.05, 0.2, 0.5, 1.0, 2.0, 4.0], steps=10, progress=False)
    accs = [a["accuracy"] for a in result["attacks"]]
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < clean_acc  # a large enough ball does flip predictions
    cos = [a["mean_cos"] for a in result["attacks"]]
    assert cos[-1] < cos[0] < 1.0
    again = attack_split(model, data, tok.pad_token_id, [0.05, 0.2, 0.5, 1.0, 2.0, 4.0], steps=10, progress=False)
    assert json.dumps(again) == json.dumps(result)  # deterministic


def test_attack_raises_the_loss_of_every_example(trained_tiny):
    from carlrar.attack import pgd_attack
    from carlrar.data import Collator

    model, tok, data = trained_tiny
    b = Collator(tok.pad_token_id)([data[i] for i in range(len(data))])
    ids, mask, y = b["input_ids"], b["attention_mask"], b["labels"]
    model.eval()
    delta = pgd_attack(model, ids, mask, y, eps=0.1, steps=5, step_size=0.025)
    with torch.no_grad():
        before = F.cross_entropy(model(ids, mask).logits, y, reduction="none")
        after = F.cross_entropy(model(ids, mask, delta=delta).logits, y, reduction="none")
    assert (after > before).all(), (before, after)
    assert (delta.flatten(1).norm(dim=1) <= 0.1 + 1e-6).all()
    assert delta[mask == 0].abs().sum() == 0


def test_logit_margin_by_hand():
    from carlrar.attack import logit_margin

    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, -1.0], [1.0, 1.5, 4.0]])
    assert logit_margin(logits, torch.tensor([0, 0, 2])).tolist() == [1.0, -3.0, 2.5]


def test_attack_margins_agree_with_predictions_and_with_each_other(trained_tiny):
    model, tok, data = trained_tiny
    zero = attack_split(model, data, tok.pad_token_id, [0.5], steps=0, progress=False)
    assert zero["attacks"][0]["mean_margin_drop"] == pytest.approx(0.0, abs=1e-6)
    assert zero["attacks"][0]["margin_drop_per_distance"] is None  # R did not move: no slope to report
    result = attack_split(model, data, tok.pad_token_id, [0.5, 2.0], steps=10, progress=False, per_example=True)
    ex = result["per_example"]
    correct = torch.tensor(ex["clean_correct"]).bool()
    clean = torch.tensor(ex["margin"])
    assert ((clean > 0) == correct).all()  # the margin is positive exactly on the correctly classified examples
    assert result["mean_margin"] == pytest.approx(clean[correct].mean().item(), abs=1e-3)
    for row, per in zip(result["attacks"], ex["attacks"]):
        adv = torch.tensor(per["margin"])
        assert ((adv > 0) == torch.tensor(per["correct"]).bool()).all()
        drop = (clean - adv)[correct].mean().item()
        assert row["mean_margin_drop"] == pytest.approx(drop, abs=1e-3) and drop > 0  # the attack ascends the loss
        assert row["margin_drop_per_distance"] > 0
    assert result["attacks"][1]["mean_margin_drop"] > result["attacks"][0]["mean_margin_drop"]  # larger ball


def test_attack_progress_without_a_terminal_is_a_line_per_quarter(trained_tiny, capsys):
    model, tok, data = trained_tiny
    attack_split(model, data, tok.pad_token_id, [0.5], steps=0, batch_size=1, distance_alphas=[0.1])
    n = len(data)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"attack: batch {k}/{n} ({n} examples, 2 radii)" for k in (n // 4, n // 2, 3 * n // 4, n)], lines
    attack_split(model, data, tok.pad_token_id, [0.5], steps=0, batch_size=1, progress=False)
    assert capsys.readouterr().err == ""
