"""AdversarialTrainer: carlrar's methods inside a transformers.Trainer, step for step the same as carlrar train's."""

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from carlrar import AdversarialTrainer
from carlrar.data import Collator
from carlrar.errors import UserError
from carlrar.hf_trainer import TrainRows
from carlrar.methods import METHODS, AdversarialConfig, ContrastiveConfig, Method, ReconstructionConfig
from carlrar.models import Classifier
from conftest import TOY_TRAIN

CONFIGS = (AdversarialConfig(adv_init_mag=0.1), ContrastiveConfig(carl_start_step=1, carl_negatives=4),
           ReconstructionConfig())


def toy_dataset(model_dir) -> tuple[Dataset, AutoTokenizer]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"sentence": [t for t, _ in TOY_TRAIN], "label": [y for _, y in TOY_TRAIN]})
    return data.map(lambda b: tok(b["sentence"], truncation=True), batched=True), tok


def args_for(out, **kw) -> TrainingArguments:
    base = dict(per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-3, report_to=[],
                use_cpu=True, seed=0, logging_steps=1, save_strategy="no", disable_tqdm=True)
    return TrainingArguments(str(out), **{**base, **kw})


def fresh_model(model_dir):
    torch.manual_seed(0)  # the classification head is new: the same init for both paths
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


@pytest.mark.parametrize("name", list(METHODS))
def test_one_trainer_step_gives_carlrar_trains_gradients(name, tiny_dropout_model_dir, tmp_path):
    """The Trainer's step = the loop's step (``Method`` built and called as ``train.train`` does) on one batch, at
    step 1, after the terms' ``before_step`` (CARL: banks filled; L_D on), with dropout: every gradient equal."""
    data, tok = toy_dataset(tiny_dropout_model_dir)
    rows, collate = TrainRows(data), Collator(tok.pad_token_id)
    batch = collate([rows[i] for i in range(0, 64, 8)])

    torch.manual_seed(1)
    loop_model = Classifier(fresh_model(tiny_dropout_model_dir))
    torch.manual_seed(1)
    method = Method(name, *CONFIGS, model=loop_model, train_labels=rows.labels, total_steps=4,
                    train_config=type("Cfg", (), {"model": str(tiny_dropout_model_dir), "seed": 0}))
    loop_model.train()
    torch.manual_seed(2)
    method.before_step(1, loop_model, rows, collate, 16)
    method.training_step(loop_model, batch, lambda loss: loss.backward(), 1.0, 1)

    hf = fresh_model(tiny_dropout_model_dir)
    torch.manual_seed(1)
    trainer = AdversarialTrainer(model=hf, args=args_for(tmp_path, max_steps=4), method=name, method_config=CONFIGS,
                                 train_dataset=data, processing_class=tok)
    trainer.create_optimizer()
    trainer.state.global_step = 1
    torch.manual_seed(2)
    trainer.training_step(trainer.model, batch)

    grads = {k: p.grad for k, p in loop_model.named_parameters() if p.grad is not None}
    theirs = {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads.keys() == theirs.keys() and len(grads) > 10
    assert all(torch.equal(grads[k], theirs[k]) for k in grads), name
    if name in ("carl", "carl-rar"):
        assert trainer.method.terms[0].filled  # L_D was on


def test_trainer_run_saves_a_pipeline_model_and_resumes_exactly(tiny_dropout_model_dir, tmp_path):
    """CARL (banks filled at step 1, updated by Eq. 5 every step) through Trainer.train: a run resumed from its
    step-2 checkpoint ends with the weights of the run never stopped; the saved model loads in pipeline()."""
    from transformers import pipeline

    data, tok = toy_dataset(tiny_dropout_model_dir)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)

    def run(out, resume=None):
        trainer = AdversarialTrainer(model=fresh_model(tiny_dropout_model_dir), args=args_for(out, **kw),
                                     method="carl-rar", method_config=CONFIGS, train_dataset=data,
                                     eval_dataset=data.select(range(16)), processing_class=tok)
        steps, real = [], trainer.method.training_step
        trainer.method.training_step = lambda *a, **k: steps.append(a[4]) or real(*a, **k)
        trainer.train(resume_from_checkpoint=resume)
        assert steps == ([2, 3] if resume else [0, 1, 2, 3])  # the resumed run trains steps 3 and 4 only
        return trainer

    straight = run(tmp_path / "a")
    assert (tmp_path / "a/checkpoint-2/carlrar_method_state.safetensors").is_file()
    logged = [h for h in straight.state.log_history if "method_loss_D" in h]
    assert logged and all(h["method_loss_D"] > 0 for h in logged)  # L_D trained from step 1
    assert any("eval_accuracy" in h for h in straight.state.log_history)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a/checkpoint-2"))
    a = straight.model.state_dict()
    assert all(torch.equal(a[k], v) for k, v in resumed.model.state_dict().items())
    banks = straight.method.terms[0].bank_orig.rows
    assert torch.equal(banks, resumed.method.terms[0].bank_orig.rows)

    straight.save_model(str(tmp_path / "final"))
    assert "reconstructor.dense.weight" in load_file(str(tmp_path / "final/carlrar_heads.safetensors"))
    out = pipeline("text-classification", model=str(tmp_path / "final"))(["a wonderful film"])
    assert out[0]["label"] in ("LABEL_0", "LABEL_1")


def test_readme_trainer_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    """README's Trainer example, as printed, on the tiny model (its MODEL line replaced) in a temporary folder."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"<!-- trainer-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.splitlines()) <= 16
    code = re.sub(r'^MODEL = .*$', f'MODEL = "{tiny_model_dir}"', code, flags=re.M)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs/trainer-carl/final/model.safetensors").is_file()


def test_bad_input_is_one_clear_error(tiny_model_dir, tmp_path):
    data, tok = toy_dataset(tiny_model_dir)
    with pytest.raises(UserError, match="unknown method 'carll'"):
        AdversarialTrainer(model=fresh_model(tiny_model_dir), args=args_for(tmp_path), method="carll",
                           train_dataset=data)
    with pytest.raises(UserError, match="need input_ids and label"):
        AdversarialTrainer(model=fresh_model(tiny_model_dir), args=args_for(tmp_path),
                           train_dataset=data.remove_columns(["label"]))
