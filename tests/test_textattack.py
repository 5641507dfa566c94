"""carlrar attack --recipe: the summary's arithmetic against a hand count, the word count, the one-line errors (no
TextAttack, a recipe that needs downloads), and a tiny model attacked end to end by DeepWordBug (skipped without
the optional install). Nothing here downloads: TextAttack's nltk.download calls are no-ops, flair is stood in for."""

import importlib.util
import json

import pytest
import torch

from carlrar import textattack_recipes as ta
from carlrar.cli import main
from carlrar.errors import UserError

HAVE_TEXTATTACK = importlib.util.find_spec("textattack") is not None
needs_textattack = pytest.mark.skipif(not HAVE_TEXTATTACK, reason="TextAttack is an optional install (make "
                                      "textattack); without it only the one-line error is tested")


def record(outcome: str, queries: int, words: int = 10, changed: int = 0) -> dict:
    return {"outcome": outcome, "queries": queries, "words": words, "words_changed": changed, "seconds": 0.5}


def test_summary_arithmetic_against_a_hand_count():
    records = [record("successful", 20, 10, 1), record("successful", 40, 5, 2), record("failed", 60),
               record("skipped", 1), record("failed", 30)]
    s = ta.summarize(records)
    # 5 examples: 4 right before the attack (1 skipped), 2 still right after it (the failed attacks)
    assert (s["n"], s["n_successful"], s["n_failed"], s["n_skipped"]) == (5, 2, 2, 1)
    assert s["clean_accuracy"] == pytest.approx(4 / 5)
    assert s["accuracy_under_attack"] == pytest.approx(2 / 5)
    assert s["attack_success_rate"] == pytest.approx(2 / 4)
    assert s["words_perturbed_pct"] == pytest.approx(100 * (1 / 10 + 2 / 5) / 2)  # 25 %: successful attacks only
    assert s["mean_queries"] == pytest.approx((20 + 40 + 60 + 30) / 4)  # attacked examples only
    assert s["seconds"] == pytest.approx(2.5)


def test_words_changed_counts_substitutions_and_falls_back_to_edit_distance():
    assert ta.words_changed("a good film .", "a g00d flim .") == (4, 2)
    assert ta.words_changed("a good film", "a good film") == (3, 0)
    assert ta.words_changed("a very good film", "a good film") == (4, 1)  # one word deleted
    assert ta.words_changed("a good film", "a go od film") == (3, 2)  # split: one substituted, one inserted


def test_recipes_are_checked_in_one_line():
    assert ta.parse_recipes("DeepWordBug, pwws") == ["deepwordbug", "pwws"]
    with pytest.raises(UserError, match="needs downloads .*Universal Sentence Encoder"):
        ta.parse_recipes("textfooler")
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        ta.parse_recipes("pwws,nope")
    with pytest.raises(UserError, match="each recipe once"):
        ta.parse_recipes("pwws,pwws")


def test_without_textattack_the_recipe_is_a_one_line_error(tiny_model_dir, toy_files, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "textattack" else real(name, *a))
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_:
        main(["attack", "--model", str(tiny_model_dir), "--file", str(toy_files["dev"]), "--text-column", "sentence",
              "--recipe", "deepwordbug", "--output", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: carlrar attack --recipe needs TextAttack") and "make textattack" in lines[0]
    assert not out.exists()


@needs_textattack
def test_the_wrapper_pads_to_the_longest_and_gives_each_text_its_own_logits(tiny_model_dir):
    from carlrar.models import load_tokenizer, load_trained

    ta.import_textattack()
    model, tokenizer = load_trained(tiny_model_dir), load_tokenizer(str(tiny_model_dir))
    texts = ["a", "a wonderful film , warm and witty and wise", "awful"]
    batched = ta.model_wrapper(model, tokenizer, max_length=128)(texts)
    alone = [ta.model_wrapper(model, tokenizer, max_length=128)([t])[0] for t in texts]
    assert batched.shape == (3, 2)
    assert torch.allclose(torch.tensor(batched), torch.tensor(alone), atol=1e-5)


@pytest.fixture
def boundary_model_dir(tiny_model_dir, toy_files, tmp_path):
    """The tiny random model with its classifier's bias moved so that the toy dev texts sit on both sides of the
    decision boundary, close to it: right on some, wrong on others, and some within reach of a character edit (the
    random model alone calls every text LABEL_1)."""
    from carlrar.data import read_labelled_file
    from carlrar.evaluate import predict_texts
    from carlrar.models import load_tokenizer, load_trained

    model, tokenizer = load_trained(tiny_model_dir), load_tokenizer(str(tiny_model_dir))
    texts = read_labelled_file(str(toy_files["dev"]), "sentence", "label", ["0", "1"]).texts
    margin = (predict_texts(model, tokenizer, texts).log() @ torch.tensor([-1.0, 1.0])).median()
    with torch.no_grad():
        model.hf.classifier.bias += torch.tensor([margin / 2, -margin / 2])
    model.save(tmp_path / "boundary", tokenizer)
    return tmp_path / "boundary"


@needs_textattack
def test_a_tiny_model_attacked_end_to_end_by_deepwordbug(boundary_model_dir, toy_files, tmp_path, capsys):
    out = tmp_path / "dwb.jsonl"
    argv = ["attack", "--model", str(boundary_model_dir), "--file", str(toy_files["dev"]), "--text-column", "sentence",
            "--recipe", "deepwordbug", "--query-budget", "50", "--seed", "3", "--output", str(out)]
    main(argv)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "dwb_summary.json").read_text())
    assert len(records) == 8 and summary["recipes"]["deepwordbug"]["n"] == 8 and summary["query_budget"] == 50
    for r in records:
        assert r["outcome"] in ta.OUTCOMES and r["queries"] <= 50
        assert (r["outcome"] == "skipped") == (r["pred_before"] != r["label"])
        assert (r["outcome"] == "successful") == (r["pred_after"] != r["label"] and r["pred_before"] == r["label"])
        assert (r["perturbed"] == r["original"]) == (r["words_changed"] == 0)
    counts = {o: sum(r["outcome"] == o for r in records) for o in ta.OUTCOMES}
    s = summary["recipes"]["deepwordbug"]
    assert s["accuracy_under_attack"] == counts["failed"] / 8 and s["clean_accuracy"] == (8 - counts["skipped"]) / 8
    assert counts["successful"] > 0 and counts["skipped"] > 0  # the attack really ran, and flipped predictions
    main(argv)  # each example under its own seed: the same run gives the same attacks
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_rar_samples_are_replayed_as_a_transfer_attack(boundary_model_dir, toy_files, tmp_path):
    """No TextAttack needed: each example's generated text against the target; outcomes from its predictions."""
    from carlrar.evaluate import predict_texts
    from carlrar.models import load_tokenizer, load_trained

    model, tokenizer = load_trained(boundary_model_dir), load_tokenizer(str(boundary_model_dir))
    texts = ["a wonderful film", "i hated it", "superb", "awful"]
    labels = [1, 0, 1, 0]
    generated = ["a wonderful wonderful", "i loved it", "superb", "great"]
    samples = [{"text": t, "original_decoded": t, "generated": g, "label": str(y), "edit_rate": 0.5,
                "changed": t != g} for t, g, y in zip(texts, generated, labels)]
    records = ta.replay_samples(model, tokenizer, texts, labels, ["0", "1"], samples)
    before = predict_texts(model, tokenizer, texts).argmax(-1).tolist()
    after = predict_texts(model, tokenizer, generated).argmax(-1).tolist()
    for r, b, a, y, t, g in zip(records, before, after, labels, texts, generated):
        want = "skipped" if b != y else "successful" if (t != g and a != y) else "failed"
        assert (r["outcome"], r["pred_before"], r["pred_after"], r["queries"]) == (want, str(b), str(a), 0)
    assert [r["words_changed"] for r in records] == [1, 1, 0, 1]
    with pytest.raises(UserError, match="no sample for 1 of the 5 examples"):
        ta.replay_samples(model, tokenizer, texts + ["new"], labels + [1], ["0", "1"], samples)
    with pytest.raises(UserError, match="--samples .* goes with --recipe rar-samples"):
        ta.require_textattack(["rar-samples"], None)


@needs_textattack
def test_reproduce_attacks_every_run_and_the_report_compares_with_freelb(tiny_model_dir, toy_files, tmp_path):
    """A grid of FreeLB and RAR (one seed, 4 steps each) with text_attack: DeepWordBug on 4 dev examples and RAR's
    samples replayed; the report's table cells are the runs' summaries."""
    import yaml

    toy = {"model": str(tiny_model_dir), "train_file": str(toy_files["train"]), "dev_file": str(toy_files["dev"]),
           "text_column": "sentence", "max_steps": 4, "eval_steps": 2, "batch_size": 8, "lr": 1e-3}
    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({
        "methods": ["freelb", "rar"], "datasets": ["toy"], "seeds": [0], "datasets_overrides": {"toy": toy},
        "attack": {"eps": [0.1], "steps": 2, "distance_alphas": []},
        "text_attack": {"recipes": ["deepwordbug"], "examples": 4, "seed": 1, "rar_samples": "rar"}}))
    results = tmp_path / "results"
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])
    text = results / "text_attacks"
    for run in ("toy-freelb-s0", "toy-rar-s0"):
        summary = json.loads((text / f"{run}_summary.json").read_text())
        assert summary["examples"] == 4 and set(summary["recipes"]) == {"deepwordbug"}
        replay = json.loads((text / f"{run}-rar-samples_summary.json").read_text())
        assert replay["recipes"]["rar-samples"]["n"] == 4 and replay["recipes"]["rar-samples"]["mean_queries"] == 0
    assert len((text / "toy-rar-s0-samples.jsonl").read_text().splitlines()) == 4
    before = {f.name: f.read_bytes() for f in text.iterdir()}
    main(["reproduce", "--protocol", str(protocol), "--results", str(results)])  # done: nothing attacked again
    assert {f.name: f.read_bytes() for f in text.iterdir()} == before
    main(["report", str(results)])
    report = (results / "report.md").read_text()
    assert "## Accuracy under text attacks (toy, 4 dev examples" in report and "| RAR − FreeLB |" in report
    rar = json.loads((text / "toy-rar-s0_summary.json").read_text())["recipes"]["deepwordbug"]
    section = report.split("## Accuracy under text attacks")[1]
    row = next(line for line in section.splitlines() if line.startswith("| RAR | 1 |"))
    assert f"| {100 * rar['accuracy_under_attack']:.2f} |" in row


@needs_textattack
def test_pwws_without_wordnet_is_a_one_line_error(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(ta, "NLTK_DATA", tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    ta.require_textattack(["deepwordbug"])  # needs no WordNet
    with pytest.raises(UserError, match="recipe pwws needs WordNet .*scripts/nltk-data.sh"):
        ta.require_textattack(["deepwordbug", "pwws"])


def test_report_of_a_folder_of_attack_outputs_by_hand(tmp_path, capsys):
    """carlrar report on carlrar attack --recipe outputs alone: mean ± std over seeds of accuracy under attack, and
    the paired bootstrap vs FreeLB over the same examples."""
    from carlrar.ownership import json_text

    outcomes = {("freelb", 0): "FFSK", ("freelb", 1): "FSSK", ("carl", 0): "FFFK", ("carl", 1): "FFSS"}
    for (method, seed), codes in outcomes.items():
        run = f"sst2-{method}-s{seed}"
        names = {"F": "failed", "S": "successful", "K": "skipped"}
        records = [{"index": i, "recipe": "deepwordbug", **record(names[c], 10)} for i, c in enumerate(codes)]
        (tmp_path / f"{run}.jsonl").write_text("".join(json_text(r) + "\n" for r in records))
        summary = {"run": run, "method": method, "train_seed": seed, "data": "sst2_dev", "seed": 0,
                   "recipes": {"deepwordbug": {**ta.summarize(records), "wall_seconds": 60.0}}}
        (tmp_path / f"{run}_summary.json").write_text(json_text(summary))
    main(["report", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    # under attack: FreeLB 2/4 and 1/4 → 37.50 ± 17.68; CARL 3/4 and 2/4 → 62.50 ± 17.68; clean 75 and 75 / 75 and 100
    assert "| FreeLB | 2 | 75.00 ± 0.00 | 37.50 ± 17.68 |" in report
    assert "| CARL | 2 | 87.50 ± 17.68 | 62.50 ± 17.68 |" in report
    row = next(line for line in report.splitlines() if line.startswith("| CARL − FreeLB |"))
    assert row.split("|")[3].strip().startswith("+25.0 [")  # the difference of the means, 62.5 − 37.5
