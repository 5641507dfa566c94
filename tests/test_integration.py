"""Real learning: MiniLM fine-tuned on 500 SST-2 (GLUE) examples through the CLI, evaluated on the full dev set."""

import json

import pytest

from carlrar.cli import main
from conftest import SHARED_DATA


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "sst2_glue").is_dir(), reason="../shared/data not present")
def test_minilm_learns_sst2_from_500_examples(tmp_path):
    out = tmp_path / "minilm"
    main(["train", "--dataset", "sst2", "--data_dir", str(SHARED_DATA), "--model", "minilm", "--train_subset", "500",
          "--epochs", "3", "--batch_size", "16", "--lr", "5e-5", "--eval_steps", "0", "--seed", "0",
          "--output_dir", str(out)])
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["train_examples"] == 500 and final["dev"]["n"] == 872
    assert final["dev"]["accuracy"] >= 0.75, final["dev"]["accuracy"]
