"""A reproduce grid's text-level attacks (a protocol's ``text_attack:`` section), after its runs are trained.

For every done run (not a trunk) of the grid, on one seeded subset of dev, the same for every run:
- the TextAttack recipes: RESULTS/text_attacks/<run>.jsonl and <run>_summary.json (as ``carlrar attack --recipe``);
- with ``rar_samples: METHOD``: that seed's METHOD run decodes its text-form samples of the subset once
  (``carlrar generate`` at the protocol's largest ε: <rar run>-samples.jsonl), replayed against every run of the same
  dataset and seed: <run>-rar-samples.jsonl and its summary.
A run already attacked (its summary exists) is skipped, so the pass resumes, and a protocol that gains the section
attacks the runs an earlier sitting trained. ``carlrar report`` reads the files (``carlrar.report_text``).
"""

from __future__ import annotations

from pathlib import Path

from carlrar.textattack_recipes import RAR_SAMPLES, run_recipes


def _model_and_subset(cfg, ta):
    """A run's trained model and tokenizer, and the protocol's seeded dev subset, encoded with its labels."""
    from carlrar.models import label_names
    from carlrar.reproduce import model_and_dev

    model, tokenizer, dev, _ = model_and_dev(cfg, ta.examples, ta.seed)
    return model, tokenizer, dev, label_names(model)


def rar_samples(protocol, cfg, out: Path) -> Path:
    """The RAR run's text-form samples of the subset (written once; ``carlrar generate``'s JSONL)."""
    from carlrar.generate import generate_split, write_samples

    if not out.is_file():
        ta, attack = protocol.text_attack, protocol.attack
        model, tokenizer, data, names = _model_and_subset(cfg, ta)
        records = generate_split(model, tokenizer, data, list(data.texts), names, max(attack.eps), attack.steps,
                                 attack.step_size, attack.norm, max_length=cfg.max_length)
        write_samples(records, out, {"model": str(cfg.output_dir), "examples": ta.examples, "seed": ta.seed,
                                     "eps": max(attack.eps), "steps": attack.steps})
    return out


def text_attack_pass(protocol, results: Path, index: dict, configs: dict, say=print):
    """Every done run attacked by the recipes, and by the samples of its seed's ``rar_samples`` run."""
    from carlrar.generate import read_samples
    from carlrar.reproduce import run_name

    ta, text_dir = protocol.text_attack, results / "text_attacks"
    done = [(name, r) for name, r in index["runs"].items() if r.get("status") == "done" and r["method"] != "trunk"
            and name in configs]
    for name, entry in done:
        about = {"run": name, "method": entry["method"], "train_seed": entry["seed"], "data": f"{entry['dataset']}_dev"}
        todo = [] if (text_dir / f"{name}_summary.json").is_file() else list(ta.recipes)
        source = run_name(entry["dataset"], ta.rar_samples, entry["seed"]) if ta.rar_samples else None
        replay = source and index["runs"].get(source, {}).get("status") == "done" \
            and not (text_dir / f"{name}-{RAR_SAMPLES}_summary.json").is_file()
        if not (todo or replay):
            continue
        cfg = configs[name][0]
        model, tokenizer, data, names = _model_and_subset(cfg, ta)
        if todo:
            say(f"── text attacks: {name}: {', '.join(todo)} on {len(data)} dev examples")
            run_recipes(model, tokenizer, data, names, todo, text_dir / f"{name}.jsonl", ta.query_budget, ta.seed,
                        cfg.max_length, {"model": str(cfg.output_dir), **about})
        if replay:
            samples = rar_samples(protocol, configs[source][0], text_dir / f"{source}-samples.jsonl")
            say(f"── text attacks: {name}: {RAR_SAMPLES} of {source}")
            run_recipes(model, tokenizer, data, names, [RAR_SAMPLES], text_dir / f"{name}-{RAR_SAMPLES}.jsonl",
                        seed=ta.seed, max_length=cfg.max_length,
                        about={"model": str(cfg.output_dir), **about, "samples": str(samples)},
                        samples=read_samples(samples))
