"""``carlrar selfcheck``: does every registered method train, save, reload and attack on this device?

Per method: a tiny BERT built from a config (no download) and a tokenizer trained on a built-in toy corpus; about
20 optimiser steps of the method's own step function and terms (CARL fills its banks half-way); then the model is
saved, reloaded and attacked (3-step k-PGD). One line per method: a verdict and the median step time.

What fails a method, and why each is a real defect:

- a step, the save, the reload or the attack raises (e.g. a CPU tensor meeting a GPU one), or a loss is not finite;
- **stray tensors**: during one watched step an operation mixes the device with another one (a CPU scalar tensor or
  CPU indices meeting a GPU tensor: no error, but a silent copy every step), or after training a parameter, an
  optimiser state or a method tensor (CARL's banks) is not on the device;
- **dropout replay**: FreeLB-style steps reuse one set of dropout masks in every pass (``DropoutReplay``). With
  δ held at 0, every pass of a step sees the same input, so with replay its logits must agree on the model's device,
  which they do only if the RNG that draws the masks there (the GPU's, on a GPU) is restored. The same step with
  replay off must give different logits, or dropout is not in play and the check would prove nothing;
- the reloaded model's logits differ from the trained model's.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from carlrar.errors import UserError

POSITIVE = ["a wonderful film", "great acting and a moving story", "i loved every minute", "brilliant and funny",
            "a delight from start to finish", "superb", "warm , witty and wise", "the best film this year"]
NEGATIVE = ["a terrible film", "boring and far too long", "i hated every minute", "dull and lifeless",
            "a mess from start to finish", "awful", "cold , flat and stupid", "the worst film this year"]
BATCH_SIZE, MAX_LENGTH = 8, 32


@dataclass
class Verdict:
    method: str
    problems: list[str] = field(default_factory=list)
    step_ms: float = float("nan")
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        what = "; ".join(self.problems) if self.problems else ", ".join(self.checked)
        return f"{self.method:10s} {'ok  ' if self.ok else 'FAIL'} {self.step_ms:8.1f} ms/step  {what}"


class DeviceWatch(TorchDispatchMode):
    """Records every operation whose tensor arguments sit on more than one device (Python numbers are not tensors
    here, so ``x * 2.0`` is fine; ``x * torch.tensor(2.0)`` with ``x`` on a GPU is not). A 0-d integer tensor is
    not counted: torch's own kernels pass RNG seeds and offsets that way (SDPA's dropout keeps them on the CPU)."""

    def __init__(self):
        super().__init__()
        self.mixed: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {str(t.device) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                   and (t.dim() > 0 or t.is_floating_point())}
        if len(devices) > 1:
            self.mixed.setdefault(str(func), set()).update(devices)
        return func(*args, **kwargs)

    def report(self) -> list[str]:
        return [f"{op} mixes {' and '.join(sorted(d))}" for op, d in sorted(self.mixed.items())]


def pick_device(name: str | None) -> torch.device:
    """``name``, or this machine's accelerator, else the CPU; a one-line error when ``name`` is not here."""
    if name is None:
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if name != "cpu" and (here is None or here.type != name):
        has = f"a {here.type}" if here else "a CPU only"
        raise UserError(f"device = {name!r}: not available here (this machine has {has})")
    return torch.device(name)


def toy_data():
    """The built-in corpus (each sentence 4 times), a tokenizer trained on it, and the encoded split."""
    from carlrar.data import EncodedSplit, Split
    from carlrar.models import train_unigram_tokenizer

    texts = (POSITIVE + NEGATIVE) * 4
    labels = ([1] * len(POSITIVE) + [0] * len(NEGATIVE)) * 4
    tokenizer = train_unigram_tokenizer(POSITIVE + NEGATIVE, vocab_size=200)
    return tokenizer, EncodedSplit(Split(texts, labels, "selfcheck"), tokenizer, MAX_LENGTH)


def tiny_classifier(tokenizer, seed: int):
    """A 2-layer, hidden-32 BERT with dropout 0.1 (the replay check needs dropout), built from a config."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from carlrar.models import Classifier

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LENGTH, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, pad_token_id=tokenizer.pad_token_id, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(seed)
    return Classifier(AutoModelForSequenceClassification.from_config(config))


def batches(data, collate, device: torch.device, seed: int):
    """Length-grouped training batches on ``device``, epoch after epoch, as ``carlrar train`` draws them."""
    from carlrar.data import LengthGroupedBatchSampler

    sampler, epoch = LengthGroupedBatchSampler(data.lengths, BATCH_SIZE, seed), 0
    while True:
        sampler.set_epoch(epoch)
        for idx in sampler:
            yield {k: v.to(device) for k, v in collate([data[i] for i in idx]).items()}
        epoch += 1


def synchronize(device: torch.device):
    if device.type != "cpu":
        torch.get_device_module(device).synchronize()


def train_steps(model, method, optimizer, scheduler, data, collate, device, steps: int, seed: int) -> tuple:
    """``steps`` optimiser steps as ``carlrar train`` takes them (the method's hooks, its step, clipping, AdamW);
    the hooks and the last step watched for mixed devices. The median step time (ms, the watched step left out)
    and the problems seen."""
    model.train()
    draw, times, problems, watch = batches(data, collate, device, seed), [], [], DeviceWatch()
    for step in range(steps):
        batch = next(draw)
        with watch:  # e.g. CARL's bank fill, once, at its start step
            method.before_step(step, model, data, collate, BATCH_SIZE)
        synchronize(device)
        started = time.perf_counter()
        with watch if step == steps - 1 else contextlib.nullcontext():  # the last step: CARL's L_D is on
            logs = method.training_step(model, batch, lambda loss: loss.backward(), step=step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times += [time.perf_counter() - started] if step < steps - 1 else []
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        problems += [f"non-finite {', '.join(bad)} at step {step}"] if bad else []
    return 1000 * statistics.median(times), problems + watch.report()


def off_device(model, optimizer, method, device: torch.device) -> list[str]:
    """What the run keeps that is not on ``device``: parameters, buffers, optimiser state, the method's tensors
    (0-d ones are flags made for the checkpoint, not kept)."""
    held = [*(("parameter " + n, p) for n, p in model.named_parameters()),
            *(("buffer " + n, b) for n, b in model.named_buffers()),
            *(("optimiser state " + k, v) for s in optimizer.state.values() for k, v in s.items()
              if isinstance(v, torch.Tensor)),
            *(("method tensor " + k, v) for k, v in method.state_tensors().items() if v.dim() > 0)]
    strays = [f"{what} on {t.device}" for what, t in held if t.device.type != device.type]
    return strays[:3] + ([f"... {len(strays) - 3} more off {device}"] if len(strays) > 3 else [])


def replay_problems(model, batch, device: torch.device) -> list[str]:
    """FreeLB's passes with δ held at 0 (no init, α = 0): with dropout replay their logits must agree; without,
    they must not (else dropout is not in play and agreement proves nothing)."""
    from carlrar.methods import AdversarialConfig, freelb_step

    def pass_logits(reuse: bool) -> list[torch.Tensor]:
        logits = []
        hook = model.register_forward_hook(
            lambda m, args, kwargs, out: logits.append(out.logits.detach()) if kwargs.get("delta") is not None
            else None, with_kwargs=True)
        try:
            adv = AdversarialConfig(adv_init_mag=0.0, adv_lr=0.0, adv_steps=3, adv_reuse_dropout=reuse)
            freelb_step(model, batch, lambda loss: loss.backward(), adv)
        finally:
            hook.remove()
            model.zero_grad(set_to_none=True)
        return logits

    model.train()
    spread = lambda xs: max((x - xs[0]).abs().max().item() for x in xs[1:])  # noqa: E731
    replayed, fresh = spread(pass_logits(True)), spread(pass_logits(False))
    if fresh < 1e-4:
        return [f"dropout replay not verifiable: passes agree without replay too ({fresh:.1e})"]
    if replayed > 1e-5:
        return [f"dropout replay: replayed passes differ by {replayed:.1e} on {device} (its RNG not restored?)"]
    return []


def save_reload_attack(model, tokenizer, data, collate, device: torch.device, folder: Path) -> list[str]:
    """Save as ``carlrar train`` does, reload as ``carlrar attack`` does, compare, attack (3-step k-PGD)."""
    from carlrar.attack import AttackConfig, run_attack
    from carlrar.models import load_trained

    model.eval()
    b = {k: v.to(device) for k, v in collate([data[i] for i in range(2 * BATCH_SIZE)]).items()}
    with torch.no_grad():
        before = model(b["input_ids"], b["attention_mask"]).logits
    model.save(folder, tokenizer)
    again = load_trained(folder).to(device).eval()
    with torch.no_grad():
        after = again(b["input_ids"], b["attention_mask"]).logits
    problems = [] if torch.allclose(before, after, atol=1e-5) else \
        [f"reloaded logits differ by {(before - after).abs().max().item():.1e}"]
    saved, loaded = model.heads.state_dict(), again.heads.state_dict()
    if saved.keys() != loaded.keys() or any(not torch.equal(saved[k], loaded[k]) for k in saved):
        problems.append(f"heads not reloaded as saved ({', '.join(model.heads) or 'none'})")
    attack = AttackConfig(eps=[0.1], steps=3, distance_alphas=[])
    result = run_attack(again, data, tokenizer.pad_token_id, attack, 2 * BATCH_SIZE, progress=False)
    if not all(math.isfinite(v) for v in result["attacks"][0].values()):
        problems.append(f"attack: non-finite results {result['attacks'][0]}")
    return problems


def check_method(name: str, device: torch.device, steps: int, tokenizer, data, folder: Path, seed: int = 0):
    """One method's verdict: train, the device and replay checks, save, reload, attack."""
    from carlrar.config import TrainConfig
    from carlrar.data import Collator
    from carlrar.methods import AdversarialConfig, ContrastiveConfig, Method, freelb_step
    from carlrar.train import make_optimizer

    verdict, collate = Verdict(name), Collator(tokenizer.pad_token_id)
    try:
        model = tiny_classifier(tokenizer, seed).to(device)
        # CARL: L_D from half-way (banks filled just before), m as large as the toy corpus allows
        method = Method(name, AdversarialConfig(), ContrastiveConfig(carl_start_step=0.5, carl_negatives=16),
                        model=model, train_labels=data.labels, total_steps=steps)
        optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-3, warmup_ratio=0.0), steps)
        verdict.step_ms, problems = train_steps(model, method, optimizer, scheduler, data, collate, device, steps,
                                                seed)
        verdict.problems += problems + off_device(model, optimizer, method, device)
        verdict.checked = [f"{steps} steps", f"all on {device.type}"]
        if method.spec.step is freelb_step:  # the steps that replay dropout masks
            verdict.problems += replay_problems(model, next(batches(data, collate, device, seed)), device)
            verdict.checked.append("dropout replay")
        verdict.problems += save_reload_attack(model, tokenizer, data, collate, device, folder / name)
        verdict.checked += ["save + reload", "3-step attack"]
    except Exception as e:  # noqa: BLE001 (whatever breaks is this method's verdict; the others still run)
        verdict.problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return verdict


def run_selfcheck(device_name: str | None = None, steps: int = 20, methods=None, say=print) -> list[Verdict]:
    """Every registered method (or ``methods``) on ``device_name`` (default: this machine's accelerator, else the
    CPU); one line each through ``say``."""
    from carlrar.methods import METHODS

    device = pick_device(device_name)
    tokenizer, data = toy_data()
    say(f"carlrar selfcheck on {device} (torch {torch.__version__}): {steps} steps per method, a tiny BERT on "
        f"{len(data)} built-in examples")
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="carlrar-selfcheck-") as folder:
        for name in methods or METHODS:
            verdicts.append(check_method(name, device, steps, tokenizer, data, Path(folder)))
            say(verdicts[-1].line())
    failed = [v.method for v in verdicts if not v.ok]
    say(f"{len(verdicts) - len(failed)} of {len(verdicts)} methods ok" + (f"; failed: {', '.join(failed)}"
                                                                          if failed else ""))
    return verdicts
