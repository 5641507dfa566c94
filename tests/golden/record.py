"""Golden traces: per-step training scalars and dev metrics of short runs, recorded before a refactor and compared
after it (issue 13: "the numbers may not move").

    python tests/golden/record.py record toy      # tiny random BERT on the toy set (what tests/test_golden.py checks)
    python tests/golden/record.py check real     # MiniLM, demo preset, 40 steps (minutes; not part of make test)

Every run evaluates after every step (``eval_steps 1``), so ``metrics.jsonl`` holds each step's training scalars
at full precision next to the dev metrics. Threads are fixed: a different thread count may sum in another order.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
SHARED_DATA = TESTS.parents[0].parent / "shared" / "data"

# name → (method, extra flags); CARL starts at half of the run, after its bank fill
TOY_RUNS = {
    "base": ("base", []),
    "freelb": ("freelb", []),
    "pgd": ("pgd", ["--pgd_clean"]),
    "fgm": ("fgm", []),
    "carl": ("carl", ["--carl_start_step", "6", "--carl_negatives", "8"]),
    "carl-nce-proj-bank": ("carl", ["--carl_start_step", "6", "--carl_negatives", "8", "--carl_estimator", "nce",
                                    "--carl_proj_dim", "16", "--carl_positive", "bank"]),
    "rar": ("rar", []),
    "carl-rar": ("carl-rar", ["--carl_start_step", "6", "--carl_negatives", "8"]),
    "carl-rar-accum": ("carl-rar", ["--carl_start_step", "3", "--carl_negatives", "8", "--grad_accum", "2",
                                    "--batch_size", "4", "--rar_passes", "last"]),
}
REAL_RUNS = {
    "base": ("base", []),
    "freelb": ("freelb", []),
    "carl": ("carl", ["--carl_start_step", "20", "--carl_negatives", "1900"]),
    "rar": ("rar", []),
    "carl-rar": ("carl-rar", ["--carl_start_step", "20", "--carl_negatives", "1900"]),
}


def toy_args(tmp: Path, model: Path | None = None) -> list[str]:
    """Flags of the toy runs; ``model``: conftest's ``tiny_dropout_model_dir`` (built here when not given)."""
    sys.path.insert(0, str(TESTS))
    from conftest import NEGATIVE, POSITIVE, TOY_TRAIN, make_tiny_bert, write_tsv

    model = model or tmp / "tiny-bert-dropout"
    if not model.exists():
        make_tiny_bert(model, dropout=0.1, seed=0)
    train = write_tsv(tmp / "train.tsv", TOY_TRAIN)
    dev = write_tsv(tmp / "dev.tsv", [(t, 1) for t in POSITIVE[:4]] + [(t, 0) for t in NEGATIVE[:4]])
    return ["--model", str(model), "--train_file", str(train), "--dev_file", str(dev), "--text_column", "sentence",
            "--batch_size", "8", "--lr", "1e-3", "--max_steps", "12", "--eval_steps", "1", "--log_steps", "100",
            "--seed", "0", "--threads", "1"]


def real_args(tmp: Path) -> list[str]:
    return ["--preset", "demo", "--data_dir", str(SHARED_DATA), "--max_steps", "40", "--eval_steps", "1",
            "--log_steps", "10", "--threads", "2"]


def run(kind: str, name: str, tmp: Path, model: Path | None = None) -> dict:
    """Train one golden run; its trace: every evaluation record and the final dev metrics."""
    from carlrar.cli import main

    method, extra = (TOY_RUNS if kind == "toy" else REAL_RUNS)[name]
    out = tmp / f"{kind}-{name}"
    common = toy_args(tmp, model) if kind == "toy" else real_args(tmp)
    main(["train", *common, "--method", method, *extra, "--output_dir", str(out), "--overwrite"])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "final_metrics.json").read_text())
    return {"method": method, "flags": extra, "evals": evals,
            "final": {"best_step": final["best_step"], "dev": final["dev"], "steps": final["steps"],
                      "parameters": final["parameters"], "skipped_steps": final["skipped_steps"]}}


def path_of(kind: str, name: str) -> Path:
    return HERE / f"{kind}-{name}.json"


def main(argv: list[str]):
    action, kind, *names = argv
    runs = TOY_RUNS if kind == "toy" else REAL_RUNS
    names = names or list(runs)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            trace = run(kind, name, Path(tmp))
            if action == "record":
                path_of(kind, name).write_text(json.dumps(trace, indent=1) + "\n")
                print(f"recorded {path_of(kind, name).name}", file=sys.stderr)
            else:
                want = json.loads(path_of(kind, name).read_text())
                same = trace["final"] == want["final"] and len(trace["evals"]) == len(want["evals"]) and all(
                    {k: have.get(k) for k in w} == w for w, have in zip(want["evals"], trace["evals"]))
                print(f"{kind}-{name}: {'same' if same else 'DIFFERENT'}", file=sys.stderr)
                failed += [] if same else [name]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
