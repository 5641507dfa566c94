"""``carlrar reproduce``: the paper's comparison as a grid of runs, methods × datasets × seeds.

Each run: train (best-dev checkpoint kept) → clean dev (+ test when the dataset has a test file) → k-PGD at each ε
(Table 5) → unprojected R vs R^adv distances per α (Table 4), attacked on all of dev or on the protocol's seeded subset
of it (``DevSubset``). Layout of RESULTS:

  index.json              the protocol, the command, and one entry per run: status (done / failed / pending), seconds
  runs/<name>.json        everything ``carlrar report`` needs about one finished run, incl. per-example results
  models/<name>/          the run's ``carlrar train`` output directory (model, checkpoint while running)

A run is done when its ``runs/<name>.json`` exists; done runs are skipped. An interrupted run resumes from its
training checkpoint (or goes straight to the attack when training had finished). A failed run is recorded with its
error, the grid goes on, and the command exits non-zero; running it again retries the run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import ClassVar, NamedTuple

from carlrar.attack import AttackConfig
from carlrar.checkpoint import CHECKPOINT, STATE
from carlrar.config import (PRESETS, Limits, TrainConfig, check, coerce_options, config_field, from_mappings,
                            read_yaml)
from carlrar.errors import UserError
from carlrar.ownership import json_text, locked, write_whole
from carlrar.textattack_recipes import TextAttackConfig
from carlrar.validation import SEED_MAX

PROTOCOLS = Path(__file__).parent / "protocols"
# relative cost of a run when no run of that method has finished yet (from benchmarks/step_time.py + attack)
COST = {"base": 1.0, "freelb": 1.5, "pgd": 2.0, "fgm": 1.5, "carl": 2.4, "rar": 2.6, "carl-rar": 3.4}


@dataclasses.dataclass
class DevSubset:
    """The dev examples a protocol's k-PGD attacks (keys of its ``attack:`` section beside ``AttackConfig``'s): all of
    dev, or a seeded subset drawn with its own seed, not the run's, so that every run of a dataset is attacked on the
    same examples in the same order (the report's paired bootstrap pairs them one by one). Not ``AttackConfig``
    fields: ``carlrar attack`` has its own --limit / --seed for that."""

    examples: int | None = config_field(None, "attack a seeded subset of this many dev examples (None: all of dev)")
    seed: int = config_field(0, "seed of the subset")

    LIMITS: ClassVar[Limits] = Limits(minimum={"examples": 1, "seed": 0}, maximum={"seed": SEED_MAX})

    def __post_init__(self):
        check(self)


class GridAttack(NamedTuple):
    """How one dataset's runs are attacked: k-PGD's knobs and the dev examples."""

    config: AttackConfig
    dev: DevSubset


@dataclasses.dataclass
class Protocol:
    """A grid of runs (``methods`` × ``datasets`` × ``seeds``) and how each is trained and attacked.

    ``variants`` names option sets (each with its ``method``) that ``methods`` may list like methods. With a
    ``trunk`` (options of one run per dataset and seed, e.g. FreeLB until validation accuracy plateaus), the
    ``branches`` (method or variant names) start from the trunk's last checkpoint (``--init_from``: weights,
    optimiser, schedule, RNG, data position) and train ``branch_steps`` more steps; every other method trains as
    many steps in all (trunk + branch) from scratch. CARL branches start L_D at the branch step."""

    methods: list[str]
    datasets: list[str]
    seeds: list[int]
    train: dict
    datasets_overrides: dict
    attack: AttackConfig
    source: str
    dev_subset: DevSubset = dataclasses.field(default_factory=DevSubset)  # read from the attack: section
    attack_overrides: dict = dataclasses.field(default_factory=dict)  # dataset → attack: keys on top of the section
    variants: dict = dataclasses.field(default_factory=dict)
    trunk: dict = dataclasses.field(default_factory=dict)
    branches: list = dataclasses.field(default_factory=list)
    branch_steps: int = 0
    text_attack: TextAttackConfig | None = None  # TextAttack recipes (and RAR's samples) on a subset of dev
    pairs: list = dataclasses.field(default_factory=list)  # [A, B]: `carlrar report` adds A − B beside A − FreeLB
    # the seeds `carlrar report`'s family rule averages validation over (empty: each variant's all): a protocol that
    # later runs some methods on more seeds keeps the rule it declared on the seeds every variant has
    selection_seeds: list = dataclasses.field(default_factory=list)
    # dataset → variants the family rule leaves out: runs declared as diagnostics ("no choice is made from them")
    # are reported beside the others but never become a family's choice
    selection_excluded: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str) -> Protocol:
        path = protocol_path(name_or_path)
        data = read_protocol(path)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)} - {"source", "dev_subset"}
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
        attack, dev_subset = from_mappings((AttackConfig, DevSubset), data.get("attack") or {}, f"{path}: attack")
        if not isinstance(data.get("attack_overrides") or {}, dict):
            raise UserError(f"{path}: attack_overrides: expected a mapping of dataset: attack keys")
        protocol = cls(methods=list(data.get("methods", ["base", "freelb", "carl", "rar", "carl-rar"])),
                       datasets=list(data.get("datasets", ["sst2"])), seeds=list(data.get("seeds", [0, 1, 2])),
                       train=data.get("train") or {}, datasets_overrides=data.get("datasets_overrides") or {},
                       attack=attack, dev_subset=dev_subset, attack_overrides=data.get("attack_overrides") or {},
                       source=str(path), variants=data.get("variants") or {},
                       trunk=data.get("trunk") or {}, branches=list(data.get("branches") or []),
                       branch_steps=int(data.get("branch_steps") or 0), pairs=list(data.get("pairs") or []),
                       selection_seeds=list(data.get("selection_seeds") or []),
                       selection_excluded=data.get("selection_excluded") or {},
                       text_attack=TextAttackConfig.from_dict(data["text_attack"], f"{path}: text_attack")
                       if data.get("text_attack") else None)
        if protocol.text_attack and protocol.text_attack.rar_samples not in (None, *protocol.methods):
            raise UserError(f"{path}: text_attack: rar_samples {protocol.text_attack.rar_samples!r} is not one of "
                            "the methods")
        if protocol.trunk and not (protocol.trunk.get("max_steps") and protocol.branch_steps > 0):
            raise UserError(f"{path}: a trunk needs its max_steps and a branch_steps > 0")
        from carlrar.methods import METHODS

        def known(key: str, names: list) -> None:  # report keys name runs: each a method or one of the variants
            unknown = [m for m in names if m not in METHODS and m not in protocol.variants]
            if unknown:
                raise UserError(f"{path}: {key}: {unknown[0]!r} is neither a method nor one of the variants")

        for pair in protocol.pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair)):
                raise UserError(f"{path}: pairs: expected [A, B] method or variant names, got {pair!r}")
            known("pairs", pair)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in protocol.selection_seeds):
            raise UserError(f"{path}: selection_seeds: expected a list of integer seeds")
        excluded = protocol.selection_excluded
        if not (isinstance(excluded, dict) and all(isinstance(v, list) for v in excluded.values())):
            raise UserError(f"{path}: selection_excluded: expected a mapping of dataset: [method or variant names]")
        for names in excluded.values():
            known("selection_excluded", names)
        for dataset in protocol.attack_overrides:  # bad keys or values fail here, before any run
            protocol.attack_for(dataset)
        return protocol

    def attack_for(self, dataset: str) -> GridAttack:
        """How ``dataset``'s runs are attacked: the ``attack:`` section with the dataset's ``attack_overrides`` on top
        (e.g. a subset of AG News's 2,000 dev examples, all 872 of SST-2's)."""
        own = self.attack_overrides.get(dataset) or {}
        where = f"{self.source}: attack_overrides: {dataset}"
        if not isinstance(own, dict):
            raise UserError(f"{where}: expected a mapping of attack keys")
        merged = {**dataclasses.asdict(self.attack), **dataclasses.asdict(self.dev_subset), **own}
        return GridAttack(*from_mappings((AttackConfig, DevSubset), merged, where))

    def grid(self) -> list[tuple[str, str, int]]:
        """(dataset, name, seed) in running order: seeds outermost (a partial grid compares every method), each
        seed's trunk before its branches."""
        trunk = ["trunk"] if self.trunk else []
        return [(d, m, s) for s in self.seeds for d in self.datasets for m in trunk + self.methods]

    def narrow(self, methods: str | None = None, datasets: str | None = None, seeds: str | None = None):
        """The grid of --methods / --datasets (comma-separated) and --seeds (N: seeds 0..N-1, or comma-separated)
        where given, instead of the protocol's."""
        if methods:
            self.methods = [m.strip() for m in methods.split(",") if m.strip()]
        if datasets:
            self.datasets = [d.strip() for d in datasets.split(",") if d.strip()]
        if seeds:
            try:
                numbers = [int(s) for s in seeds.split(",") if s.strip()]
            except ValueError:
                raise UserError(f"--seeds {seeds!r}: expected a number or comma-separated integers") from None
            if numbers == [0] and "," not in seeds:  # N = 0 seeds is never what was meant: seed 0 alone is "0,"
                raise UserError("--seeds 0 is no seeds (a number N means seeds 0..N-1): for seed 0 alone, --seeds 0,")
            self.seeds = list(range(numbers[0])) if len(numbers) == 1 and "," not in seeds else numbers
        if not (self.methods and self.datasets and self.seeds):
            raise UserError("the grid is empty: give at least one method, dataset and seed")


def protocol_path(name_or_path: str, beside: Path | None = None) -> Path:
    """A protocol file: a path (relative to ``beside``'s folder when given, e.g. an ``extends:`` in another file),
    else a name shipped in ``protocols/``."""
    path = Path(name_or_path)
    for candidate in ([beside.parent / path] if beside else []) + [path, PROTOCOLS / f"{name_or_path}.yaml"]:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in PROTOCOLS.glob("*.yaml")))
    where = f"{beside}: extends: " if beside else ""
    raise UserError(f"{where}unknown protocol {name_or_path!r}: not a file and not one of {known}")


# sections whose keys a protocol that ``extends:`` another sets on top of the other's (each key replaced whole);
# every other key (lists such as methods, seeds, branches; branch_steps) replaces the other's
MERGED_SECTIONS = ("train", "attack", "variants", "trunk", "datasets_overrides", "attack_overrides")


def read_protocol(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A protocol file's mapping, with ``extends: OTHER`` (a shipped name or a path) resolved: OTHER's mapping with
    this file's keys on top (``MERGED_SECTIONS`` key by key), so that a protocol differing in one setting says only
    that setting and cannot drift from the one it extends."""
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a protocol name or file, got {parent!r}")
    parent_path = protocol_path(parent, beside=path)
    if parent_path.resolve() in seen + (path.resolve(),):
        raise UserError(f"{path}: extends: {parent!r} extends it back (a cycle)")
    merged = read_protocol(parent_path, seen + (path.resolve(),))
    for key, value in data.items():
        if key in MERGED_SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def run_name(dataset: str, method: str, seed: int) -> str:
    return f"{dataset}-{method}-s{seed}"


def run_configs(protocol: Protocol, dataset: str, name: str, seed: int, models_dir: Path, extra: dict):
    """TrainConfig + the method's config dataclasses: dataset preset < protocol train < per-dataset < variant (or
    trunk) < --set; then a branch's or a scratch run's steps."""
    from carlrar.methods import METHODS, config_classes

    own = protocol.trunk if name == "trunk" else protocol.variants.get(name, {})
    method = own.get("method", "freelb" if name == "trunk" else name)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r} (known: {', '.join(METHODS)}; variants: "
                        f"{', '.join(protocol.variants) or 'none'})")
    options = {}
    preset = PRESETS / f"{dataset}.yaml"
    layers = [(read_yaml(preset) if preset.is_file() else {}, str(preset)), (protocol.train, protocol.source),
              (protocol.datasets_overrides.get(dataset) or {}, f"{protocol.source}: {dataset}"),
              ({k: v for k, v in own.items() if k != "method"}, f"{protocol.source}: {name}"), (extra, "--set")]
    for data, where in layers:  # keys of other methods are valid, and ignored here
        options.update(coerce_options(data, (TrainConfig, *config_classes()), where))
    own_files = bool(options.get("train_file"))  # a user's dataset: its name only names the runs
    options.update(method=method, dataset=None if own_files else dataset, seed=seed, preset=None, config=None,
                   output_dir=str(models_dir / run_name(dataset, name, seed)), overwrite=False)
    if protocol.trunk and name != "trunk":
        trunk_steps = int(protocol.trunk["max_steps"])
        options["max_steps"] = trunk_steps + protocol.branch_steps  # the same steps in all, branch or not
        if name in protocol.branches:
            options["init_from"] = str(models_dir / run_name(dataset, "trunk", seed))
            if "carl_start_step" not in own and "carl_start_rule" not in own:
                options["carl_start_step"] = trunk_steps  # L_D from the branch step, banks filled just before
    classes = (TrainConfig, *METHODS[method].config_classes)
    return tuple(c(**{f.name: options[f.name] for f in dataclasses.fields(c) if f.name in options}) for c in classes)


def write_json(path: Path, data):
    """Atomic (a reader or a crash never sees half a file) and valid JSON (no NaN): ownership's writer."""
    write_whole(path, json_text(data, indent=1))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def model_and_dev(cfg, examples: int | None = None, seed: int = 0):
    """A run's trained model and tokenizer, its dev split encoded with the model's labels (a seeded subset of
    ``examples`` when given: the same for every run of the dataset, whatever the run's seed), and dev's full size."""
    from transformers import AutoTokenizer

    from carlrar.data import EncodedSplit, load_dataset, subset
    from carlrar.models import label_names, load_trained

    out = cfg.resolved_output_dir()
    model, tokenizer = load_trained(out), AutoTokenizer.from_pretrained(out)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_file, cfg.dev_file, cfg.test_file, cfg.text_column,
                      cfg.label_column)
    dev = ds.split_for_model("dev", label_names(model))
    return model, tokenizer, EncodedSplit(subset(dev, examples, seed), tokenizer, cfg.max_length), len(dev)


def execute_run(configs, attack: GridAttack | None) -> dict:
    """Train (resuming if interrupted), then attack the chosen model on dev or its seeded subset (a trunk: no
    attack). Clean dev accuracy (training's) is always all of dev."""
    from carlrar.attack import run_attack
    from carlrar.config import to_dict
    from carlrar.train import train

    cfg = configs[0]
    out = cfg.resolved_output_dir()
    final_file = out / "final_metrics.json"
    final = json.loads(final_file.read_text()) if final_file.exists() else train(*configs)
    record = {"config": to_dict(*configs), "final": final, "curves": read_jsonl(out / "metrics.jsonl"),
              "diagnostics": read_jsonl(out / "diagnostics.jsonl")}
    if cfg.init_from and not cfg.init_weights_only:
        trunk = Path(cfg.init_from)
        record["branch"] = {"trunk": trunk.name, "step": final["init_from"]["step"]}
        record["trunk_curves"] = [c for c in read_jsonl(trunk / "metrics.jsonl") if c["step"] <= record["branch"]["step"]]
    if attack is None:
        return record
    model, tokenizer, dev, n_dev = model_and_dev(cfg, attack.dev.examples, attack.dev.seed)
    result = run_attack(model, dev, tokenizer.pad_token_id, attack.config, cfg.eval_batch_size, seed=cfg.seed,
                        per_example=True)
    per_example = result.pop("per_example")
    # which examples: the report names a subset and checks that every run of the dataset had the same ones
    result["dev_subset"] = {"examples": len(dev), "of": n_dev, "seed": attack.dev.seed if len(dev) < n_dev else None}
    return {**record, "attack": result, "per_example": per_example}


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def format_seconds(s: float) -> str:
    h, m = divmod(int(s) // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m"


def estimate_remaining(index: dict, pending: list[tuple[str, str, int]]) -> float:
    """Mean seconds of finished runs of the same method; otherwise all finished runs scaled by COST."""
    done = [r for r in index["runs"].values() if r["status"] == "done" and r.get("seconds")]
    if not done:
        return float("nan")
    per_base = sum(r["seconds"] / COST.get(r["method"], 2.0) for r in done) / len(done)
    total = 0.0
    for dataset, method, _ in pending:
        same = [r["seconds"] for r in done if r["method"] == method and r["dataset"] == dataset]
        total += sum(same) / len(same) if same else per_base * COST.get(method, 2.0)
    return total


def reproduce(protocol: Protocol, results: Path, extra: dict | None = None, keep_checkpoints: bool = False,
              command: str = "") -> dict:
    """Run (or resume) the grid; return the index. Seeds outermost, so a partial grid compares every method."""
    extra = extra or {}
    if protocol.text_attack and protocol.text_attack.recipes:  # TextAttack missing: one line, before any run
        from carlrar.textattack_recipes import require_textattack

        require_textattack(protocol.text_attack.recipes)
    grid = protocol.grid()
    models_dir = results / "models"
    configs = {run_name(*g): run_configs(protocol, *g, models_dir, extra) for g in grid}  # bad options fail here
    from carlrar.data import load_dataset

    for d in protocol.datasets:  # missing or malformed data fails before anything runs
        c = configs[run_name(d, protocol.methods[0], protocol.seeds[0])][0]
        load_dataset(c.dataset, c.data_dir, c.train_file, c.dev_file, c.test_file, c.text_column, c.label_column)
    try:
        (results / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the results folder {results}: {e.strerror}") from None
    with locked(results):  # one grid per results folder: two would write one index.json and race for its runs
        index = run_grid(protocol, results, configs, grid, extra, keep_checkpoints, command)
    failed = [n for n, r in index["runs"].items() if r["status"] == "failed"]
    if failed:
        say(f"{len(failed)} run(s) failed: " + "; ".join(f"{n}: {index['runs'][n]['error']}" for n in failed))
    return index


def trunk_unfinished(results: Path, configs: dict, grid: list, name: str, dataset: str, seed: int) -> str | None:
    """Why a done trunk must train again, or None: its checkpoint/ is gone (models/ is not kept across machines) or
    stops short of the trunk's steps (a retrain interrupted), while a branch of its dataset and seed in this grid is
    not done. Training it again resumes from whatever checkpoint it has; a branch never starts mid-trunk."""
    cfg = configs[name][0]
    state = Path(cfg.output_dir) / CHECKPOINT / STATE
    step = json.loads(state.read_text()).get("step", 0) if state.is_file() else None
    if step is not None and step >= cfg.max_steps:
        return None
    pending = any(not (results / "runs" / f"{n}.json").exists() for n, (d, m, s) in zip(configs, grid)
                  if (d, s) == (dataset, seed) and configs[n][0].init_from == cfg.output_dir)
    return None if not pending else "its checkpoint is gone" if step is None else \
        f"its checkpoint stops at step {step} of {cfg.max_steps}"


def run_grid(protocol: Protocol, results: Path, configs: dict, grid: list, extra: dict, keep_checkpoints: bool,
             command: str) -> dict:
    """``reproduce``'s grid, under the results folder's lock: the index brought up to date, then each run not done."""
    index_file = results / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {"runs": {}}
    index.update(protocol=dataclasses.asdict(protocol), command=command or index.get("command", ""),
                 extra=extra)
    (results / "trunks").mkdir(exist_ok=True)
    for name, (d, m, s) in zip(configs, grid):
        done = (results / ("trunks" if m == "trunk" else "runs") / f"{name}.json").exists()
        why = done and m == "trunk" and trunk_unfinished(results, configs, grid, name, d, s)
        if why:
            done = False  # trained again (same seed; resuming its checkpoint if any) for its pending branches
            say(f"{name}: done, but {why} and a branch still needs it; training it again")
        entry = index["runs"].get(name, {})
        status = entry.get("status", "pending")
        index["runs"][name] = {**entry, "dataset": d, "method": m, "seed": s,  # done means: its JSON exists
                               "status": "done" if done else "pending" if status == "done" else status}
    write_json(index_file, index)

    todo = [(name, g) for name, g in zip(configs, grid) if index["runs"][name]["status"] != "done"]
    say(f"{len(grid) - len(todo)}/{len(grid)} runs done; {len(todo)} to go")
    for k, (name, g) in enumerate(todo):
        eta = estimate_remaining(index, [g for _, g in todo[k:]])
        say(f"── run {len(grid) - len(todo) + k + 1}/{len(grid)}: {name}"
            + (f" · about {format_seconds(eta)} left in the grid" if eta == eta else ""))
        entry = index["runs"][name]
        started = time.time()
        try:
            record = execute_run(configs[name], None if g[1] == "trunk" else protocol.attack_for(g[0]))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 (recorded and reported; the grid goes on)
            entry.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0],
                         traceback=traceback.format_exc()[-2000:])
            write_json(index_file, index)
            say(f"   FAILED: {entry['error']}")
            continue
        seconds = time.time() - started  # this sitting only, when a run was resumed
        record.update(name=name, dataset=g[0], method=g[1], seed=g[2], seconds=round(seconds, 1))
        trunk = g[1] == "trunk"  # its checkpoint stays: the branches start from it
        write_json(results / ("trunks" if trunk else "runs") / f"{name}.json", record)
        if not keep_checkpoints and not trunk:
            shutil.rmtree(Path(configs[name][0].output_dir) / "checkpoint", ignore_errors=True)
        entry.update(status="done", seconds=round(seconds, 1), error=None, traceback=None,
                     dev_accuracy=record["final"]["dev"]["accuracy"],
                     attack={str(a["eps"]): a["accuracy"] for a in record.get("attack", {}).get("attacks", [])})
        write_json(index_file, index)
        say(f"   done in {format_seconds(seconds)}: dev {entry['dev_accuracy']:.4f}" + (" · under attack " + " / ".join(
            f"{v:.4f}" for v in entry["attack"].values()) if entry["attack"] else ""))
    if protocol.text_attack:  # after the grid: it attacks every done run that has not been (also earlier ones)
        from carlrar.reproduce_text import text_attack_pass

        text_attack_pass(protocol, results, index, configs, say)
    return index

