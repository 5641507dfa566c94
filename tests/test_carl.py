"""CARL against hand computations: the two estimators (Eq. 2–4), the bank (Eq. 5), negatives, the schedule."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from carlrar.config import TrainConfig
from carlrar.methods import AdversarialConfig, ContrastiveConfig, Method
from carlrar.objectives import ContrastiveTerm
from carlrar.objectives import ContrastiveLoss, MemoryBank, NegativeSampler
from carlrar.objectives.contrastive import bank_scores
from carlrar.train import train

# B = 2, m = 3, d = 4, unit vectors chosen so every dot product is easy to read off.
E = torch.eye(4)
R = torch.stack([E[0], E[1]])
R_ADV = torch.tensor([[0.6, 0.8, 0, 0], [0, 0.6, 0.8, 0]])
ROWS_ORIG = torch.stack([E[0], E[1], E[2], E[3]])
NEG = torch.tensor([[1, 2, 3], [0, 2, 3]])  # ex0 draws rows 1, 2, 3; ex1 rows 0, 2, 3 (same ids in both banks)
# L_D^a (anchor R_adv, positive R, negatives B_orig[NEG]):  ex0 pos 0.6, neg 0.8 0 0 ; ex1 pos 0.6, neg 0 0.8 0
# L_D^o (anchor R, positive R_adv, negatives B_adv[NEG]):   with B_adv rows 1, 2, 3 := (0.6, 0.8, 0, 0), e4, e4
#                                                           ex0 pos 0.6, neg 0.6 0 0 ; ex1 pos 0.6, neg 0 0 0
DOTS_A = [(0.6, [0.8, 0, 0]), (0.6, [0, 0.8, 0])]
DOTS_O = [(0.6, [0.6, 0, 0]), (0.6, [0, 0, 0])]


def banks():
    orig, adv = MemoryBank(4, 4), MemoryBank(4, 4)
    orig.rows.copy_(ROWS_ORIG)
    adv.rows.copy_(torch.stack([E[3], torch.tensor([0.6, 0.8, 0, 0]), E[3], E[3]]))  # rows 1,2,3 as above
    return orig, adv


def softmax_term(dots, tau):
    return sum(-math.log(math.exp(p / tau) / (math.exp(p / tau) + sum(math.exp(n / tau) for n in neg)))
               for p, neg in dots) / len(dots)


def test_softmax_estimator_by_hand():
    tau = 0.07
    loss, logs = ContrastiveLoss(tau, "softmax")(R, R_ADV, *banks(), NEG)
    assert logs["loss_D_a"] == pytest.approx(softmax_term(DOTS_A, tau), rel=1e-5)
    assert logs["loss_D_o"] == pytest.approx(softmax_term(DOTS_O, tau), rel=1e-5)
    assert loss.item() == pytest.approx(softmax_term(DOTS_A, tau) + softmax_term(DOTS_O, tau), rel=1e-5)


def test_nce_estimator_by_hand_with_fixed_then_moving_z():
    tau, N, m = 0.5, 10, 3
    pn = 1 / N

    def nce_term(dots, Z):
        total = 0.0
        for p, neg in dots:
            P = math.exp(p / tau) / Z
            total += math.log(P / (P + m * pn)) + sum(math.log(m * pn / (math.exp(n / tau) / Z + m * pn)) for n in neg)
        return -total / len(dots)

    def z_of(dots):  # N · mean of h over the batch's B × (m + 1) scores
        hs = [math.exp(x / tau) for p, neg in dots for x in [p, *neg]]
        return N * sum(hs) / len(hs)

    crd = ContrastiveLoss(tau, "nce", num_rows=N, z_momentum=0.0)
    _, logs = crd(R, R_ADV, *banks(), NEG)
    za, zo = z_of(DOTS_A), z_of(DOTS_O)
    assert logs["loss_D_a"] == pytest.approx(nce_term(DOTS_A, za), rel=1e-5)
    assert logs["loss_D_o"] == pytest.approx(nce_term(DOTS_O, zo), rel=1e-5)
    # CRD keeps the first Z; the moving average mixes in the new batch's estimate
    zero = MemoryBank(4, 4)
    zero.rows.zero_()
    crd(R, R_ADV, zero, zero, NEG)
    assert crd.Z.tolist() == pytest.approx([zo, za], rel=1e-6)
    ema = ContrastiveLoss(tau, "nce", num_rows=N, z_momentum=0.9)
    ema(R, R_ADV, *banks(), NEG)
    ema(R, R_ADV, zero, zero, NEG)  # negatives' dots all 0 now
    za2 = z_of([(0.6, [0, 0, 0]), (0.6, [0, 0, 0])])
    assert ema.Z[1].item() == pytest.approx(0.9 * za + 0.1 * za2, rel=1e-6)


def test_each_anchor_gets_gradient_and_the_banks_none():
    r, r_adv = R.clone().requires_grad_(), R_ADV.clone().requires_grad_()
    orig, adv = banks()
    loss_fn = ContrastiveLoss(0.07)
    pos = (r * r_adv.detach()).sum(1)
    loss_fn.term(pos, bank_scores(r, adv, NEG), view=0).backward()  # L_D^o alone: its anchor R moves
    assert r.grad.abs().sum() > 0 and r_adv.grad is None
    pos = (r_adv * r.detach()).sum(1)
    loss_fn.term(pos, bank_scores(r_adv, orig, NEG), view=1).backward()  # L_D^a alone: its anchor R^adv moves
    assert r_adv.grad.abs().sum() > 0
    assert not orig.rows.requires_grad and orig.rows.grad is None and adv.rows.grad is None
    r.grad = r_adv.grad = None
    loss, _ = loss_fn(r, r_adv, orig, adv, NEG)  # both terms, live positives: both get gradient
    loss.backward()
    assert r.grad.abs().sum() > 0 and r_adv.grad.abs().sum() > 0


def test_bank_positives_option_uses_the_other_views_rows():
    orig, adv = banks()
    index = torch.tensor([1, 2])  # B_orig rows e2, e3 ; B_adv rows (0.6, 0.8, 0, 0), e4
    _, logs = ContrastiveLoss(1.0)(R, R_ADV, orig, adv, NEG, index=index)
    # L_D^a positives: R_adv · B_orig[index] = 0.8, 0.8 ; L_D^o positives: R · B_adv[index] = 0.6, 0
    assert logs["score_pos"] == pytest.approx((0.8 + 0.8) / 2)
    expected_o = softmax_term([(0.6, [0.6, 0, 0]), (0.0, [0, 0, 0])], 1.0)
    assert logs["loss_D_o"] == pytest.approx(expected_o, rel=1e-5)


def test_bank_update_is_eq5_then_normalised_and_fp16_halves_memory():
    bank = MemoryBank(3, 2, momentum=0.5)
    bank.rows.copy_(torch.tensor([[1.0, 0], [0, 1.0], [0.6, 0.8]]))
    bank.update(torch.tensor([0]), torch.tensor([[0.0, 1.0]]))
    # 0.5·(1, 0) + 0.5·(0, 1) = (0.5, 0.5) → normalised (0.7071, 0.7071); other rows untouched
    assert torch.allclose(bank.rows, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0, 1.0], [0.6, 0.8]]), atol=1e-6)
    bank.fill(torch.tensor([2]), torch.tensor([[3.0, 4.0]]))
    assert bank.rows[2].tolist() == pytest.approx([0.6, 0.8])
    assert MemoryBank(1000, 384).rows.nbytes == 1000 * 384 * 4
    assert MemoryBank(1000, 384, dtype=torch.float16).rows.nbytes == 1000 * 384 * 2


def test_negatives_never_share_the_label_and_are_capped():
    labels = [0, 1, 2, 0, 1, 2, 0, 0]
    sampler = NegativeSampler(labels, m=4)
    batch = torch.tensor([0, 1, 2, 0])
    neg = sampler.sample(batch)
    assert neg.shape == (4, 4)
    for anchor_label, row in zip(batch.tolist(), neg.tolist()):
        assert all(labels[j] != anchor_label for j in row)
    with pytest.warns(UserWarning, match="only 4"):
        capped = NegativeSampler(labels, m=100)  # label 0 has 4 others, labels 1 and 2 have 6
    assert capped.m == 4


def carl_config(tiny_model_dir, toy_files, out, **kw):
    base = dict(method="carl", model=str(tiny_model_dir), train_file=str(toy_files["train"]),
                dev_file=str(toy_files["dev"]), text_column="sentence", output_dir=str(out), batch_size=8, lr=5e-3,
                max_steps=8, eval_steps=4, log_steps=4, seed=0, warmup_ratio=0.0, group_by_length=False)
    return TrainConfig(**{**base, **kw})


CARL_KNOBS = ContrastiveConfig(carl_start_step=3, carl_negatives=16)


def test_fill_pass_touches_every_index_once_without_updating(tiny_model_dir, toy_files, monkeypatch):
    from transformers import AutoTokenizer

    from carlrar.data import Collator, EncodedSplit, load_files
    from carlrar.models import load_classifier

    ds = load_files(str(toy_files["train"]), str(toy_files["dev"]), text_column="sentence")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = EncodedSplit(ds.splits["train"], tok, 32)
    model = load_classifier(str(tiny_model_dir), ds.label_names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    carl = ContrastiveTerm(CARL_KNOBS, AdversarialConfig(), model, train_labels=data.labels, total_steps=10)
    seen = []
    real_fill = MemoryBank.fill
    monkeypatch.setattr(MemoryBank, "fill", lambda self, idx, v: (seen.append((id(self), idx.tolist())),
                                                                   real_fill(self, idx, v)))
    assert not carl.before_step(2, model, data, Collator(tok.pad_token_id), 16)  # before the start step
    assert carl.before_step(3, model, data, Collator(tok.pad_token_id), 16)
    assert not carl.before_step(4, model, data, Collator(tok.pad_token_id), 16)  # only once
    for bank in (carl.bank_orig, carl.bank_adv):
        touched = [i for b, idx in seen if b == id(bank) for i in idx]
        assert sorted(touched) == list(range(len(data)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the two banks differ: B_adv holds representations of perturbed inputs
    assert not torch.allclose(carl.bank_orig.rows, carl.bank_adv.rows)


def test_resume_after_fill_gives_same_banks_and_next_losses(tiny_model_dir, toy_files, tmp_path, monkeypatch):
    adv = AdversarialConfig(adv_init_mag=0.0)
    train(carl_config(tiny_model_dir, toy_files, tmp_path / "straight"), adv, CARL_KNOBS)
    real_step = Method.training_step

    def crash_after_fill(self, *a, **kw):
        if self.term(ContrastiveTerm).filled:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Method, "training_step", crash_after_fill)
    with pytest.raises(KeyboardInterrupt):
        train(carl_config(tiny_model_dir, toy_files, tmp_path / "resumed"), adv, CARL_KNOBS)
    assert json.loads((tmp_path / "resumed/checkpoint/trainer_state.json").read_text())["step"] == 3
    monkeypatch.setattr(Method, "training_step", real_step)
    train(carl_config(tiny_model_dir, toy_files, tmp_path / "resumed"), adv, CARL_KNOBS)
    a = load_file(str(tmp_path / "straight/checkpoint/method_state.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoint/method_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa
    straight, resumed = lines("straight"), lines("resumed")
    assert [r["step"] for r in resumed] == [4, 8]
    assert "train_loss_D" in straight[0] and straight[0]["train_loss_D"] > 0
    assert [r.get("train_loss_D") for r in resumed] == [r.get("train_loss_D") for r in straight]
    assert [r["dev_loss"] for r in resumed] == [r["dev_loss"] for r in straight]


def test_carl_raises_cos_between_r_and_r_adv_over_freelb(tiny_learner_dir, toy_files, tmp_path):
    from transformers import AutoTokenizer

    from carlrar.attack import attack_split
    from carlrar.data import EncodedSplit, load_files
    from carlrar.models import load_trained

    adv = AdversarialConfig(adv_init_mag=0.0, adv_lr=0.3, adv_steps=2)
    common = dict(max_steps=150, eval_steps=0, log_steps=1000, lr=1e-3)
    train(carl_config(tiny_learner_dir, toy_files, tmp_path / "freelb", method="freelb", **common), adv)
    train(carl_config(tiny_learner_dir, toy_files, tmp_path / "carl", **common), adv,
          ContrastiveConfig(carl_start_step=37, carl_negatives=16))
    ds = load_files(str(toy_files["train"]), str(toy_files["dev"]), text_column="sentence")
    tok = AutoTokenizer.from_pretrained(tiny_learner_dir)
    data = EncodedSplit(ds.splits["train"], tok, 32)

    def last(run):  # the weights after the last step (the output dir holds the best-dev ones)
        model = load_trained(tmp_path / run)
        model.load_state_dict(load_file(str(tmp_path / run / "checkpoint" / "model.safetensors")))
        return model

    # the perturbation training uses (one unprojected step of α = 0.3), in eval mode, on the training set
    results = {m: attack_split(last(m), data, tok.pad_token_id, [], steps=1, distance_alphas=[0.3], progress=False)
               for m in ("freelb", "carl")}
    assert all(r["clean_accuracy"] == 1.0 for r in results.values())  # both learned: R is not collapsed
    cos = {m: r["distances"][0]["mean_cos"] for m, r in results.items()}
    assert cos["carl"] > cos["freelb"], cos  # measured here: 0.971 vs 0.960 (seeds 1, 2: 0.969/0.959, 0.976/0.974)


def test_bank_scores_same_whether_gathered_or_over_the_whole_bank():
    bank = MemoryBank(50, 8)
    bank.fill(torch.arange(50), torch.randn(50, 8))
    anchor = F.normalize(torch.randn(4, 8), dim=1)
    few, many = torch.randint(50, (4, 3)), torch.randint(50, (4, 20))  # 12 < 50 ids: gather; 80 ≥ 50: whole bank
    for index in (few, many):
        expected = torch.einsum("bd,bmd->bm", anchor, bank.rows[index])
        assert torch.allclose(bank_scores(anchor, bank, index), expected, atol=1e-6)


def test_projection_head_is_trained_saved_and_reloaded(tiny_model_dir, toy_files, tmp_path):
    from transformers import pipeline

    from carlrar.models import load_trained

    out = tmp_path / "proj"
    train(carl_config(tiny_model_dir, toy_files, out, max_steps=4, eval_steps=2), AdversarialConfig(),
          ContrastiveConfig(carl_start_step=1, carl_negatives=8, carl_proj_dim=8))
    banks = load_file(str(out / "checkpoint" / "method_state.safetensors"))
    assert banks["bank_orig"].shape == (64, 8)  # the banks live in the projected space
    model = load_trained(out)
    assert model.heads["carl_projection"].out_features == 8
    last = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert last["heads.carl_projection.weight"].shape == (8, 32)  # trained with the model, checkpointed with it
    assert pipeline("text-classification", model=str(out))("a wonderful film")[0]["label"] in ("0", "1")


@pytest.mark.parametrize("z_momentum", [0.0, 0.9])
def test_nce_backward_over_several_steps(z_momentum):
    loss_fn = ContrastiveLoss(0.5, "nce", num_rows=4, z_momentum=z_momentum)
    orig, adv = banks()
    for _ in range(3):  # Z changes between steps; every step's backward must still see its own Z
        r, r_adv = R.clone().requires_grad_(), R_ADV.clone().requires_grad_()
        loss, _ = loss_fn(r, r_adv, orig, adv, NEG)
        loss.backward()
        assert r.grad.abs().sum() > 0 and torch.isfinite(r.grad).all()


def test_bad_option_values_are_one_line_errors():
    from carlrar.errors import UserError

    for knobs, match in ((dict(carl_estimator="NCE"), "carl_estimator"), (dict(bank_dtype="bfloat16"), "bank_dtype"),
                         (dict(carl_negatives=0), "carl_negatives")):
        with pytest.raises(UserError, match=match):
            ContrastiveConfig(**knobs)
    with pytest.raises(UserError, match="adv_norm"):
        AdversarialConfig(adv_norm="L2")
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig(batch_size=0)
    from carlrar.cli import main

    with pytest.raises(SystemExit) as e:  # the same check from the command line, before any file is read
        main(["train", "--method", "carl", "--carl_estimator", "NCE", "--train_file", "missing.tsv"])
    assert e.value.code == 2


def test_best_dev_model_is_never_from_before_the_carl_start(tiny_model_dir, toy_files, tmp_path):
    """Before its start step CARL is plain FreeLB: a best-dev checkpoint from then would report FreeLB as CARL."""
    import json

    from carlrar.methods import AdversarialConfig, ContrastiveConfig
    from carlrar.train import train
    from test_train import cfg_for

    final = train(cfg_for(tiny_model_dir, toy_files, tmp_path / "run", method="carl", max_steps=6, eval_steps=2),
                  AdversarialConfig(), ContrastiveConfig(carl_start_step=4, carl_negatives=8))
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert final["best_step"] == 6 and final["dev"]["accuracy"] == evals[-1]["dev_accuracy"]


def test_head_input_is_what_the_logits_layer_reads(tiny_model_dir):
    import copy

    from carlrar.models import load_classifier

    model = load_classifier(str(tiny_model_dir), ["neg", "pos"]).eval()
    ids, mask = torch.tensor([[101, 2204, 2143, 102], [101, 9643, 102, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert model(ids, mask).head_input is None  # only read once asked for
    assert model.read_head_input() == 32
    out = model(ids, mask)
    pooled = torch.tanh(model.hf.bert.pooler.dense(out.R))  # BERT's pooler on the final [CLS] state, by hand
    assert torch.allclose(out.head_input, pooled, atol=1e-6)
    assert torch.allclose(out.logits, model.hf.classifier(pooled), atol=1e-6)
    twin = copy.deepcopy(model)  # the hook travels with a copy and reads the copy's own layer
    twin.hf.bert.pooler.dense.bias.data += 1.0
    assert not torch.allclose(twin(ids, mask).head_input, out.head_input)
    assert torch.equal(model(ids, mask).head_input, out.head_input)


def test_carl_on_the_head_input_fills_and_trains_on_it(tiny_model_dir, toy_files, tmp_path):
    from transformers import AutoTokenizer

    from carlrar.data import Collator, EncodedSplit, load_files
    from carlrar.models import load_classifier

    ds = load_files(str(toy_files["train"]), str(toy_files["dev"]), text_column="sentence")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = EncodedSplit(ds.splits["train"], tok, 32)
    model = load_classifier(str(tiny_model_dir), ds.label_names)
    knobs = ContrastiveConfig(carl_start_step=3, carl_negatives=16, carl_representation="head_input")
    carl = ContrastiveTerm(knobs, AdversarialConfig(), model, train_labels=data.labels, total_steps=10)
    assert carl.before_step(3, model, data, Collator(tok.pad_token_id), 16)
    b = Collator(tok.pad_token_id)([data[i] for i in range(4)])
    with torch.no_grad():
        R = model.eval()(b["input_ids"], b["attention_mask"]).R
    expected = F.normalize(torch.tanh(model.hf.bert.pooler.dense(R)), dim=1)  # not R itself
    assert torch.allclose(carl.bank_orig.rows[b["index"]], expected, atol=1e-5)
    assert not torch.allclose(carl.bank_orig.rows[b["index"]], F.normalize(R, dim=1), atol=1e-2)
    out = tmp_path / "head"
    train(carl_config(tiny_model_dir, toy_files, out, max_steps=4, eval_steps=2), AdversarialConfig(),
          ContrastiveConfig(carl_start_step=1, carl_negatives=8, carl_representation="head_input"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(x.get("train_loss_D", math.nan)) for x in logged)
