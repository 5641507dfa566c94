"""carlrar's methods inside a user's own ``transformers.Trainer`` script: ``AdversarialTrainer``.

Only the training step changes: each micro-batch runs the registered method's step (``Method.training_step``, the
very function ``carlrar train`` calls) with the Trainer's backward, and each optimiser step first gives the method's
terms their ``before_step`` (CARL's bank fill at its start step, RAR's reconstructor warm-up). Everything else is the
Trainer's: batching, gradient accumulation, clipping (``max_grad_norm``), the optimiser and schedule, callbacks,
logging, ``evaluate``, ``save_model``, ``push_to_hub`` and ``resume_from_checkpoint``, whose checkpoints also hold the
terms' state (CARL's memory banks) so that a resumed run continues exactly.

Example (the toy corpus; any tokenised dataset with ``input_ids`` and ``label`` / ``labels`` works)::

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments
    from carlrar import AdversarialTrainer
    from carlrar.methods import ContrastiveConfig

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    train = dataset.map(lambda b: tok(b["sentence"], truncation=True), batched=True)
    trainer = AdversarialTrainer(model=model, args=TrainingArguments("out", max_steps=100), method="carl",
                                 method_config=ContrastiveConfig(carl_start_step=0.5), train_dataset=train,
                                 eval_dataset=dev, processing_class=tok)
    trainer.train()
    trainer.save_model("out/final")  # pipeline("text-classification", model="out/final") loads it

Scope: one process (CPU, one GPU, MPS). carlrar's methods average gradients themselves across processes
(``carlrar train`` under ``accelerate launch``); under the Trainer's DistributedDataParallel they would not, so
several processes are refused rather than trained wrongly.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from carlrar.data import Collator
from carlrar.errors import UserError
from carlrar.methods import METHODS, Method
from carlrar.models import HEADS_FILE, Classifier

METHOD_STATE = "carlrar_method_state.safetensors"  # in each checkpoint-N folder: the terms' state (CARL's banks)


class TrainRows(torch.utils.data.Dataset):
    """A tokenised dataset as the rows carlrar's methods read: ``input_ids`` (right padding trimmed by the
    ``attention_mask`` when there is one), ``label``, and the row's ``index`` (CARL's memory banks are indexed by
    it). ``lengths`` and ``labels`` serve the bank fill and CARL's negative sampler."""

    def __init__(self, dataset, what: str = "train_dataset"):
        if dataset is None or len(dataset) == 0:
            raise UserError(f"AdversarialTrainer: {what} is empty")
        first = dataset[0]
        self.label_key = next((k for k in ("labels", "label") if k in first), None)
        if "input_ids" not in first or self.label_key is None:
            raise UserError(f"AdversarialTrainer: {what} rows need input_ids and label (or labels); "
                            f"they have {', '.join(first)}")
        self.dataset = dataset
        rows = [self.row(i) for i in range(len(dataset))]
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.labels = [r["label"] for r in rows]

    def row(self, i: int) -> dict:
        item = self.dataset[i]
        ids = item["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if "attention_mask" in item:  # a dataset padded at tokenisation: the Collator pads per batch instead
            ids = ids[: int(sum(item["attention_mask"]))]
        label = item[self.label_key]
        return {"input_ids": ids, "label": int(label.item() if hasattr(label, "item") else label), "index": i}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.row(int(i))


def planned_steps(args, examples: int) -> int:
    """The optimiser steps ``Trainer.train`` will take (its own rule), which CARL's fractional start step needs
    before training starts."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(examples / args.per_device_train_batch_size)
    return max(1, math.ceil(args.num_train_epochs * max(batches // args.gradient_accumulation_steps, 1)))


def accuracy(prediction) -> dict[str, float]:
    """The default ``compute_metrics``: what CARL's plateau start rule and best-model selection read."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


class AdversarialTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a registered carlrar method (``carlrar methods``).

    Args:
        model: a Hugging Face ``*ForSequenceClassification`` model (or a carlrar ``Classifier``).
        method: ``base``, ``freelb``, ``pgd``, ``fgm``, ``carl``, ``rar`` or ``carl-rar``.
        method_config: the method's config dataclasses (one or a tuple): ``AdversarialConfig``,
            ``ContrastiveConfig``, ``ReconstructionConfig``; missing ones take their defaults (the paper's).
        train_dataset / eval_dataset: tokenised rows with ``input_ids`` and ``label`` or ``labels``.
        Any other argument is the Trainer's. The data collator is carlrar's (dynamic padding, the row index).
    """

    def __init__(self, model=None, args=None, method: str = "freelb", method_config=(), train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, **kwargs):
        if method not in METHODS:
            raise UserError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
        args = args if args is not None else TrainingArguments("tmp_trainer")  # the Trainer's own default
        if args.world_size > 1:
            raise UserError("AdversarialTrainer trains on one process; for several use carlrar train under "
                            "accelerate launch (its methods average gradients themselves)")
        classifier = model if isinstance(model, Classifier) else Classifier(model)
        rows = TrainRows(train_dataset)
        evals = None if eval_dataset is None else TrainRows(eval_dataset, "eval_dataset")
        pad = getattr(processing_class, "pad_token_id", None)
        pad = pad if pad is not None else classifier.config.pad_token_id or 0
        # a collator of the user's must give input_ids, attention_mask, labels and (CARL) the rows' index
        collate = kwargs.pop("data_collator", None) or Collator(pad)
        configs = method_config if isinstance(method_config, (tuple, list)) else (method_config,)
        classifier.to(args.device)  # the terms' heads are built on the model's device, before the optimiser
        self.method = Method(method, *configs, model=classifier, train_labels=rows.labels,
                             total_steps=planned_steps(args, len(rows)),
                             train_config=SimpleNamespace(model=classifier.config._name_or_path, seed=args.seed))
        self.method_logs: dict[str, list[float]] = {}
        super().__init__(model=classifier, args=args, train_dataset=rows, eval_dataset=evals, data_collator=collate,
                         processing_class=processing_class, compute_metrics=compute_metrics or accuracy, **kwargs)
        self.label_names = ["labels"]

    def _set_signature_columns_if_needed(self):
        """The rows' keys the Trainer must keep (it drops what the model's forward does not name)."""
        self._signature_columns = ["input_ids", "label", "index"]

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: the terms' ``before_step`` (each runs once), then the method's passes and backwards."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        step, classifier = self.state.global_step, self.accelerator.unwrap_model(model)
        self.method.before_step(step, classifier, self.train_dataset, self.data_collator,
                                self.args.per_device_eval_batch_size)
        # set by Trainer.train (fewer micro-batches at an epoch's end); the configured number outside it
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        logs = self.method.training_step(classifier, inputs, self.accelerator.backward, scale, step)
        for k, v in logs.items():
            self.method_logs.setdefault(k, []).append(v)
        return torch.tensor(logs["loss"] * scale, device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """L_C on the clean input (Eq. 8): what ``evaluate`` reports as its loss."""
        logits = model(inputs["input_ids"], inputs["attention_mask"]).logits
        loss = F.cross_entropy(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs):
        """Training log lines also carry the method's scalars (L_D, L_R, cos(R, R^adv), ...), means since the last."""
        if "loss" in logs and self.method_logs:
            logs = {**logs, **{f"method_{k}": float(np.mean(v)) for k, v in self.method_logs.items() if k != "loss"}}
            self.method_logs = {}
        super().log(logs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation; its accuracy also goes to the terms (CARL's plateau start rule)."""
        metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if f"{prefix}_accuracy" in metrics:
            self.method.after_evaluate(self.state.global_step, metrics[f"{prefix}_accuracy"])
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None):
        """carlrar's model folder: the HF files (``pipeline()`` loads them), the tokenizer, the terms' heads."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save(output_dir, self.processing_class)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        state = self.method.state_tensors()
        if state and os.path.isdir(folder):
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(folder, METHOD_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        """Weights (HF files and heads) loaded in place, then the terms' state: the optimiser, schedule and RNG
        are the Trainer's to restore."""
        classifier = self.accelerator.unwrap_model(model or self.model)
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(weights):
            raise UserError(f"cannot resume from {resume_from_checkpoint}: no model.safetensors")
        device = classifier.device
        unexpected = classifier.hf.load_state_dict(load_file(weights, device=str(device)), strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"cannot resume from {resume_from_checkpoint}: unexpected weights {unexpected[:3]}")
        heads = os.path.join(resume_from_checkpoint, HEADS_FILE)
        if len(classifier.heads):
            classifier.heads.load_state_dict(load_file(heads, device=str(device)))
        state = os.path.join(resume_from_checkpoint, METHOD_STATE)
        if os.path.isfile(state):
            self.method.load_state_tensors(load_file(state, device=str(device)))
