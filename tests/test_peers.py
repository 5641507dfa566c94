"""benchmarks/peers.py's re-creation of the published FreeLB loops (the official example, TextDefender) gives
carlrar's parameter gradients on the same batch and δ init: padding under the attention mask changes nothing, and
with dropout the masks match when carlrar draws them afresh on every pass, as the peers' stock models do."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from carlrar.methods import AdversarialConfig, freelb_step  # noqa: E402
from carlrar.models import load_classifier  # noqa: E402
from peers import MAX_SEQ_LENGTH, check, fixed_width, grads_of, largest_difference, peer_passes  # noqa: E402


def toy_batch(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["a wonderful film", "awful", "i hated it , truly , deeply"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([1, 0, 0])}
    return batch, tok.pad_token_id


@pytest.mark.parametrize("adv", [AdversarialConfig(adv_steps=2), AdversarialConfig(adv_steps=3, adv_max_norm=0.05)])
def test_peer_loops_and_carlrar_give_the_same_gradients(tiny_dropout_model_dir, adv):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_dropout_model_dir), ["neg", "pos"])
    batch, pad = toy_batch(tiny_dropout_model_dir)
    diffs = check(model, batch, adv, pad)
    assert diffs["padding"] < 1e-5, diffs  # the peer cut to the batch's longest, carlrar padded to 128
    assert diffs["dropout"] < 1e-6 and diffs["textdefender"] < 1e-6, diffs  # same shapes: same masks, same sums


def test_reusing_every_dropout_mask_is_a_real_difference(tiny_dropout_model_dir):
    """carlrar's default (every mask reused over the passes) is not the peers' fresh masks: documented, not hidden."""
    torch.manual_seed(0)
    model = load_classifier(str(tiny_dropout_model_dir), ["neg", "pos"]).train()
    batch, _ = toy_batch(tiny_dropout_model_dir)
    adv = AdversarialConfig(adv_steps=2)
    torch.manual_seed(1)
    peer_passes(model.hf, batch, adv)
    theirs = grads_of(model)
    torch.manual_seed(1)
    freelb_step(model, batch, lambda loss: loss.backward(), adv)  # adv_reuse_dropout=True
    assert largest_difference(theirs, grads_of(model)) > 1e-3


def test_fixed_width_pads_ids_and_mask():
    batch = {"input_ids": torch.tensor([[5, 6], [7, 0]]), "attention_mask": torch.tensor([[1, 1], [1, 0]]),
             "labels": torch.tensor([0, 1])}
    wide = fixed_width(batch, MAX_SEQ_LENGTH, 0)
    assert wide["input_ids"].shape == (2, MAX_SEQ_LENGTH) and int(wide["attention_mask"].sum()) == 3
    assert torch.equal(wide["input_ids"][:, :2], batch["input_ids"]) and torch.equal(wide["labels"], batch["labels"])
