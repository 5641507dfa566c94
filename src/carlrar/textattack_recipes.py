"""Text-level attacks: TextAttack recipes against a carlrar model, offline (``carlrar attack --recipe``).

TextAttack (0.3.11) is an optional install (``make textattack``); this module is the only one that imports it. What
it does that TextAttack's own ``Attacker`` would not:
- the model wrapper pads each batch of queries to its longest text, capped at the training max length
  (TextAttack's Hugging Face wrapper pads every query to 512 tokens: the same predictions, ≈ 3.6 × slower here);
- every example is attacked under its own seed (``seed`` and the example's index), so an example's attack does not
  depend on which examples came before it and the same example is attacked alike against every model;
- words changed are counted here (``words_changed``): TextAttack's ``avg_word_perturbed`` is the mean number of
  words per input, not of words changed;
- ``flair`` is stood in for (``carlrar.flair_standin``) and ``nltk.download`` makes no network call: the NLTK data
  come from ``scripts/nltk-data.sh`` (WordNet 3.0 from Debian's packages, the classic stopword list).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dataclasses import dataclass, field
from typing import ClassVar

from carlrar.config import Limits, check, config_field, from_mapping
from carlrar.errors import UserError
from carlrar.validation import SEED_MAX

# carlrar name → TextAttack recipe class: the recipes that run without downloads (DeepWordBug and Pruthi edit
# characters, PWWS swaps WordNet synonyms weighted by saliency)
RECIPES = {"deepwordbug": "DeepWordBugGao2018", "pruthi": "Pruthi2019", "pwws": "PWWSRen2019"}
# recipes that need downloads (the project guide's check of TextAttack 0.3.11 here; the reason is the one-line error)
NEED_DOWNLOADS = {
    "textbugger": "the Universal Sentence Encoder, and the 0.3.11 wheel lacks its intentional_homoglyphs.txt",
    "textfooler": "counter-fitted word embeddings and the Universal Sentence Encoder",
    "bae": "a BERT masked-language model and the Universal Sentence Encoder",
    "bert-attack": "a BERT masked-language model and the Universal Sentence Encoder",
    "pso": "HowNet sememes and counter-fitted word embeddings"}
INSTALL = "make textattack (in a carlrar checkout; see README 'Text-level attacks')"
NLTK_DATA = Path(os.environ.get("CARLRAR_NLTK_DATA", Path.home() / ".cache" / "carlrar" / "nltk_data"))
OUTCOMES = ("successful", "failed", "skipped")  # skipped: the model was already wrong on the original


# not TextAttack's: the text-form samples ``carlrar generate`` decodes from a RAR model (Table 6), replayed against
# the attacked model (a transfer attack: no queries to it), from ``--samples`` (the generate JSONL)
RAR_SAMPLES = "rar-samples"


@dataclass
class TextAttackConfig:
    """A reproduce protocol's ``text_attack:`` section: every run's model attacked by these recipes on one seeded
    subset of dev, and (``rar_samples``) the text-form samples of that seed's RAR run replayed against it."""

    recipes: list[str] = field(default_factory=lambda: ["deepwordbug", "pwws"],
                               metadata={"help": "TextAttack recipes (deepwordbug, pruthi, pwws)"})
    examples: int = config_field(200, "a seeded subset of this many dev examples, the same for every run")
    seed: int = config_field(0, "seed of the subset and of the attacks")
    query_budget: int | None = config_field(None, "at most this many model queries per example (None: no limit)")
    rar_samples: str | None = config_field(None, "a method or variant of the grid (e.g. rar) whose carlrar generate "
                                           "samples of the subset are replayed against every run of its seed")

    LIMITS: ClassVar[Limits] = Limits(minimum={"examples": 1, "seed": 0}, above={"query_budget": 0},
                                      maximum={"seed": SEED_MAX})

    def __post_init__(self):
        self.recipes = list(self.recipes) if isinstance(self.recipes, (list, tuple)) else [self.recipes]
        check(self)
        if self.recipes:
            self.recipes = parse_recipes(",".join(map(str, self.recipes)))
        if RAR_SAMPLES in self.recipes:
            raise UserError(f"recipes: {RAR_SAMPLES} is set with rar_samples: METHOD")

    @classmethod
    def from_dict(cls, data: dict, where: str) -> TextAttackConfig:
        return from_mapping(cls, data, where)


def parse_recipes(names: str) -> list[str]:
    """Comma-separated recipe names → the list, each known and runnable offline, or a one-line error."""
    recipes = [n.strip().lower() for n in names.split(",") if n.strip()]
    for name in recipes:
        if name in NEED_DOWNLOADS:
            raise UserError(f"recipe {name!r} needs downloads ({NEED_DOWNLOADS[name]}): not available offline; "
                            f"offline recipes: {', '.join(RECIPES)}")
        if name not in RECIPES and name != RAR_SAMPLES:
            raise UserError(f"unknown recipe {name!r} (offline recipes: {', '.join(RECIPES)}, {RAR_SAMPLES})")
    if not recipes or len(set(recipes)) != len(recipes):
        raise UserError(f"--recipe {names!r}: give each recipe once, e.g. deepwordbug,pwws")
    return recipes


def require_textattack(recipes: list[str], samples: str | None = None):
    """One-line errors before any model loads: TextAttack missing, WordNet missing for PWWS, rar-samples without
    --samples."""
    if (RAR_SAMPLES in recipes) != bool(samples):
        raise UserError(f"--samples (a JSONL of carlrar generate) goes with --recipe {RAR_SAMPLES}, and it needs one")
    if set(recipes) - {RAR_SAMPLES} and importlib.util.find_spec("textattack") is None:
        raise UserError(f"carlrar attack --recipe needs TextAttack, an optional install: {INSTALL}")
    if "pwws" in recipes and not _have_wordnet():
        raise UserError(f"recipe pwws needs WordNet in {NLTK_DATA}: scripts/nltk-data.sh (or make textattack)")


def _have_wordnet() -> bool:
    """WordNet in our NLTK data folder or any of NLTK's own (unpacked, or the zip nltk.download leaves)."""
    import nltk

    corpora = [Path(p) / "corpora" for p in [NLTK_DATA, *nltk.data.path]]
    return any((c / "wordnet" / "lexnames").is_file() or (c / "wordnet.zip").is_file() for c in corpora)


def import_textattack():
    """TextAttack, imported offline: flair stood in for, NLTK's data path ours and its downloads no-ops."""
    from carlrar import flair_standin

    flair_standin.install()
    import nltk

    if str(NLTK_DATA) not in nltk.data.path:
        nltk.data.path.insert(0, str(NLTK_DATA))
    # TextAttack calls nltk.download at import and in PWWS's transformation; offline each would try the network.
    # The data it asks for is already in NLTK_DATA (or, for omw-1.4, not used by English WordNet lookups).
    nltk.download = lambda *a, **k: True
    import textattack

    # its "Unknown if model of class Classifier compatible with goal function" warning: our wrapper returns logits
    textattack.shared.utils.logger.setLevel("ERROR")
    return textattack


def run_identity(model_dir: str) -> dict:
    """The run a model folder is: its folder name and, for a carlrar train folder, the method and seed it was
    trained with (the report groups attack summaries by them)."""
    import yaml

    config_file = Path(model_dir) / "carlrar_config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return {"run": Path(model_dir).resolve().name, "method": config.get("method"), "train_seed": config.get("seed")}


def model_wrapper(model, tokenizer, max_length: int, batch_size: int = 64):
    """A TextAttack ModelWrapper: texts → logits (numpy), each batch padded to its longest text (≤ max_length)."""
    from textattack.models.wrappers import ModelWrapper

    class CarlrarModelWrapper(ModelWrapper):
        def __init__(self):
            self.model = model

        @torch.no_grad()
        def __call__(self, texts):
            model.eval()
            out = []
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length,
                                padding="longest", return_tensors="pt")
                out.append(model(enc["input_ids"].to(model.device),
                                 enc["attention_mask"].to(model.device)).logits.float().cpu())
            return torch.cat(out).numpy()

    return CarlrarModelWrapper()


def build(recipe: str, wrapper, query_budget: int | None):
    import textattack.attack_recipes as recipes

    attack = getattr(recipes, RECIPES[recipe]).build(wrapper)
    if query_budget:
        attack.goal_function.query_budget = query_budget
    return attack


WORD = re.compile(r"[^\s]+")


def words_changed(original: str, perturbed: str) -> tuple[int, int]:
    """(words of the original, words changed): whitespace-separated words compared position by position when the
    counts agree (the recipes here substitute), else the word-level edit distance."""
    a, b = WORD.findall(original), WORD.findall(perturbed)
    if len(a) == len(b):
        return len(a), sum(x != y for x, y in zip(a, b))
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return len(a), row[-1]


def _seed(seed: int, index: int):
    value = (seed * 1_000_003 + index) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def attack_examples(model, tokenizer, texts: list[str], labels: list[int], names: list[str], recipe: str,
                    query_budget: int | None = None, seed: int = 0, max_length: int = 128,
                    progress=None) -> list[dict]:
    """One record per example: original, perturbed, gold label, predictions before / after, queries, outcome,
    words and words changed, seconds."""
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult

    attack = build(recipe, model_wrapper(model, tokenizer, max_length), query_budget)
    kind = {SuccessfulAttackResult: "successful", FailedAttackResult: "failed", SkippedAttackResult: "skipped"}
    records = []
    for i, (text, label) in enumerate(zip(texts, labels)):
        _seed(seed, i)
        started = time.perf_counter()
        result = attack.attack(text, int(label))
        outcome = next((v for k, v in kind.items() if isinstance(result, k)), type(result).__name__)
        perturbed = result.perturbed_result.attacked_text.text
        n_words, changed = words_changed(text, perturbed)
        records.append({"index": i, "recipe": recipe, "original": text, "perturbed": perturbed,
                        "label": names[label], "pred_before": names[int(result.original_result.output)],
                        "pred_after": names[int(result.perturbed_result.output)],
                        "queries": int(result.perturbed_result.num_queries), "outcome": outcome,
                        "words": n_words, "words_changed": changed,
                        "seconds": round(time.perf_counter() - started, 3)})
        if progress:
            progress(records[-1])
    return records


def replay_samples(model, tokenizer, texts: list[str], labels: list[int], names: list[str], samples: list[dict],
                   max_length: int = 128) -> list[dict]:
    """RAR's text-form samples as an attack: per example, the target's prediction on the raw text and on the sample
    generated from it; records as ``attack_examples`` writes them (queries 0: nothing is asked of the target). A
    sample the reconstructor left unchanged does not fool (as ``carlrar.generate.summarize`` counts it)."""
    from carlrar.evaluate import predict_texts

    by_text = {r["text"]: r for r in samples}
    missing = [t for t in texts if t not in by_text]
    if missing:
        raise UserError(f"--samples has no sample for {len(missing)} of the {len(texts)} examples (e.g. "
                        f"{missing[0][:60]!r}): generate them with the same data, --limit and --seed")
    chosen = [by_text[t] for t in texts]
    started = time.perf_counter()
    before = predict_texts(model, tokenizer, texts, max_length).argmax(-1).tolist()
    after = predict_texts(model, tokenizer, [r["generated"] for r in chosen], max_length).argmax(-1).tolist()
    seconds = (time.perf_counter() - started) / max(len(texts), 1)
    records = []
    for i, (text, label, sample, b, a) in enumerate(zip(texts, labels, chosen, before, after)):
        fooled = sample["changed"] and a != label
        n_words, changed = words_changed(sample.get("original_decoded", text), sample["generated"])
        records.append({"index": i, "recipe": RAR_SAMPLES, "original": text, "perturbed": sample["generated"],
                        "label": names[label], "pred_before": names[b], "pred_after": names[a], "queries": 0,
                        "outcome": "skipped" if b != label else "successful" if fooled else "failed",
                        "words": n_words, "words_changed": changed, "seconds": round(seconds, 4)})
    return records


def summarize(records: list[dict]) -> dict:
    """Clean accuracy and accuracy under attack (of all examples), the attack success rate (of the examples the
    model got right), words perturbed % (mean over successful attacks of changed / words), mean queries (over
    attacked examples), wall time."""
    n = len(records)
    count = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    attacked = [r for r in records if r["outcome"] != "skipped"]
    won = [r for r in records if r["outcome"] == "successful"]
    return {"n": n, **{f"n_{o}": count[o] for o in OUTCOMES},
            "clean_accuracy": len(attacked) / n if n else 0.0,
            "accuracy_under_attack": count["failed"] / n if n else 0.0,
            "attack_success_rate": len(won) / len(attacked) if attacked else 0.0,
            "words_perturbed_pct": 100 * float(np.mean([r["words_changed"] / max(r["words"], 1) for r in won]))
            if won else 0.0,
            "mean_queries": float(np.mean([r["queries"] for r in attacked])) if attacked else 0.0,
            "seconds": round(sum(r["seconds"] for r in records), 1)}


def run_recipes(model, tokenizer, data, names: list[str], recipes: list[str], out: Path,
                query_budget: int | None = None, seed: int = 0, max_length: int = 128, about: dict | None = None,
                log=None, samples: list[dict] | None = None) -> dict:
    """Every recipe on every example of ``data`` (an EncodedSplit: its raw texts are attacked). The examples go to
    ``out`` (JSONL, rewritten whole after each recipe), the summary to OUT_summary.json; returns the summary."""
    from carlrar.flair_standin import install
    from carlrar.ownership import json_text, write_whole

    textattack = set(recipes) - {RAR_SAMPLES} and import_textattack()
    summary = {**(about or {}), "examples": len(data), "seed": seed, "query_budget": query_budget,
               "max_length": max_length, "textattack": _version("textattack") if textattack else None,
               "flair_stand_in": install() if textattack else None, "recipes": {}}
    summary_file = out.with_name(out.stem + "_summary.json")
    records: list[dict] = []
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    for recipe in recipes:
        started = time.time()

        def tick(r, recipe=recipe, started=started):  # a line every 50 examples: PWWS takes minutes per 50
            if r["index"] % 50 == 49:
                log(f"{recipe}: {r['index'] + 1}/{len(data)} examples, {time.time() - started:.0f} s")

        if recipe == RAR_SAMPLES:
            new = replay_samples(model, tokenizer, list(data.texts), list(data.labels), names, samples, max_length)
        else:
            new = attack_examples(model, tokenizer, list(data.texts), list(data.labels), names, recipe,
                                  query_budget, seed, max_length, tick)
        records += new
        summary["recipes"][recipe] = {**summarize(new), "wall_seconds": round(time.time() - started, 1)}
        write_whole(out, "".join(json_text(r) + "\n" for r in records))
        write_whole(summary_file, json_text(summary, indent=2))
    return {**summary, "summary_file": str(summary_file)}


def print_summary(summary: dict):
    for recipe, s in summary["recipes"].items():
        print(f"{recipe}: clean {100 * s['clean_accuracy']:.1f} % → under attack "
              f"{100 * s['accuracy_under_attack']:.1f} % (success rate {100 * s['attack_success_rate']:.1f} %, "
              f"{s['words_perturbed_pct']:.1f} % words perturbed, {s['mean_queries']:.0f} queries, "
              f"{s['wall_seconds']:.0f} s)")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
