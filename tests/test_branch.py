"""Branches (--init_from), the validation split and the constant schedule: what the converged protocol rests on."""

import json

import pytest
import torch
from safetensors.torch import load_file

from carlrar.errors import UserError
from carlrar.methods import AdversarialConfig, ReconstructionConfig
from carlrar.train import train
from test_train import cfg_for

FREELB = AdversarialConfig(adv_init_mag=0.1)  # a random init: the branch must continue the trunk's RNG too


def trunk_and_straight(model_dir, toy_files, tmp_path, steps=4, total=8):
    """A FreeLB trunk of ``steps`` steps and a straight FreeLB run of ``total``, constant lr after no warm-up."""
    common = dict(method="freelb", lr_schedule="constant", warmup_ratio=0.0, eval_steps=2)
    train(cfg_for(model_dir, toy_files, tmp_path / "trunk", max_steps=steps, **common), FREELB)
    train(cfg_for(model_dir, toy_files, tmp_path / "straight", max_steps=total, **common), FREELB)
    return common


def test_branch_continues_the_trunk_exactly(tiny_dropout_model_dir, toy_files, tmp_path):
    """FreeLB continued from a trunk's checkpoint = the same FreeLB run never stopped (weights, optimiser, schedule,
    RNG and data position all carried over); the branch selects only among its own evaluations."""
    common = trunk_and_straight(tiny_dropout_model_dir, toy_files, tmp_path)
    final = train(cfg_for(tiny_dropout_model_dir, toy_files, tmp_path / "branch", max_steps=8,
                          init_from=str(tmp_path / "trunk"), **common), FREELB)
    a = load_file(str(tmp_path / "straight/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "branch/checkpoint/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (tmp_path / "branch/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 8]
    straight = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["dev_loss"] for r in records] == [r["dev_loss"] for r in straight[2:]]
    assert final["init_from"]["step"] == 4 and final["best_step"] in (6, 8) and final["steps"] == 8


def test_a_branch_may_add_a_head_and_must_share_the_data(tiny_model_dir, toy_files, tmp_path):
    common = dict(method="freelb", lr_schedule="constant", warmup_ratio=0.0, eval_steps=2)
    train(cfg_for(tiny_model_dir, toy_files, tmp_path / "trunk", max_steps=4, **common), FREELB)
    trunk_opt = torch.load(tmp_path / "trunk/checkpoint/optimizer.bin", weights_only=True)
    final = train(cfg_for(tiny_model_dir, toy_files, tmp_path / "rar", max_steps=6, method="rar",
                          init_from=str(tmp_path / "trunk"), lr_schedule="constant", warmup_ratio=0.0, eval_steps=2),
                  FREELB, ReconstructionConfig())
    assert final["init_from"]["new_heads"] == ["reconstructor"] and final["steps"] == 6
    opt = torch.load(tmp_path / "rar/checkpoint/optimizer.bin", weights_only=True)
    # the trunk's parameters first in each group, then the head's: 2 more steps on the trunk's Adam state
    assert [len(g["params"]) for g in opt["param_groups"]] > [len(g["params"]) for g in trunk_opt["param_groups"]]
    assert int(opt["state"][0]["step"]) == int(trunk_opt["state"][0]["step"]) + 2
    with pytest.raises(UserError, match="same train_subset"):  # another data order is not a continuation
        train(cfg_for(tiny_model_dir, toy_files, tmp_path / "bad", max_steps=6, train_subset=32,
                      init_from=str(tmp_path / "trunk"), **common), FREELB)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_rar_branch_warms_its_new_head_at_the_branch_step(tiny_model_dir, toy_files, tmp_path):
    """rar-warm in the converged protocol: the reconstructor the branch adds is fitted on the trunk's clean token
    states before the branch's first step, so L_R starts far below a random head's."""
    common = dict(lr_schedule="constant", warmup_ratio=0.0, eval_steps=2, log_steps=1)
    train(cfg_for(tiny_model_dir, toy_files, tmp_path / "trunk", max_steps=4, method="freelb", **common), FREELB)
    loss_R = {}
    for name, warm in (("cold", 0), ("warm", 30)):
        train(cfg_for(tiny_model_dir, toy_files, tmp_path / name, max_steps=5, method="rar",
                      init_from=str(tmp_path / "trunk"), **common),
              FREELB, ReconstructionConfig(rar_warmup_steps=warm, rar_warmup_lr=1e-2))
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        loss_R[name] = next(r["train_loss_R"] for r in records if r["step"] == 5)
    assert loss_R["warm"] < loss_R["cold"] - 1.0, loss_R


def test_init_weights_only_starts_at_step_zero_from_the_weights(tiny_model_dir, toy_files, tmp_path):
    train(cfg_for(tiny_model_dir, toy_files, tmp_path / "trunk", max_steps=4, lr=5e-3))
    final = train(cfg_for(tiny_model_dir, toy_files, tmp_path / "w", max_steps=1, lr=1e-12, warmup_ratio=0.0,
                          init_from=str(tmp_path / "trunk"), init_weights_only=True, seed=3))
    assert final["steps"] == 1 and "init_from" not in final
    a = load_file(str(tmp_path / "trunk/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "w/checkpoint/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-8) for k in a)  # lr 1e-12: the trunk's weights, barely moved


def test_validation_split_chooses_and_dev_is_only_reported(tiny_model_dir, toy_files, tmp_path):
    final = train(cfg_for(tiny_model_dir, toy_files, tmp_path / "run", validation_size=16, max_steps=6))
    assert final["train_examples"] == 64 - 16
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in r and "dev_accuracy" in r for r in records)
    best = max(records, key=lambda r: (r["val_accuracy"], -r["step"]))  # the first evaluation with the best val
    assert final["best_step"] == best["step"] and final["validation"]["accuracy"] == best["val_accuracy"]
    assert final["dev"]["accuracy"] == best["dev_accuracy"]  # dev of the chosen checkpoint, whatever dev's best
    assert final["validation"]["n"] == 16


def test_constant_schedule_keeps_the_rate_after_warm_up(tiny_model_dir, toy_files, tmp_path):
    from carlrar.train import make_optimizer

    model = torch.nn.Linear(2, 2)
    cfg = cfg_for(tiny_model_dir, toy_files, tmp_path / "x", lr=1e-3, warmup_ratio=0.25, lr_schedule="constant")
    opt, sched = make_optimizer(model, cfg, total_steps=8)
    rates = []
    for _ in range(8):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
