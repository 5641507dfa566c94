"""Metrics against a hand computation."""

import pytest

from carlrar.evaluate import classification_metrics


def test_metrics_by_hand():
    # gold:  0 0 0 1 1 2 ; pred: 0 1 0 1 0 2
    m = classification_metrics([0, 1, 0, 1, 0, 2], [0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class_accuracy"] == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0}
    # F1: a: p 2/3 r 2/3 → 2/3 ; b: p 1/2 r 1/2 → 1/2 ; c: 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_class_never_predicted_or_absent():
    m = classification_metrics([0, 0], [0, 1], ["a", "b", "c"])
    assert m["per_class_accuracy"]["c"] is None  # no gold examples
    assert m["macro_f1"] == pytest.approx((2 * (0.5 * 1) / 1.5 + 0 + 0) / 3)
