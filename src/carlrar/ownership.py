"""Who owns an output directory: what carlrar may delete or replace there, and the one live run it may hold.

carlrar deletes or replaces only what it can prove it wrote. A folder it trains into carries ``MARKER`` (written
when carlrar made or adopted the folder, and listing the model files ``save_best`` moved in); within it only
carlrar's own names are ever removed. A folder holding anything else is refused, with or without ``--overwrite``,
by a one-line error naming the first foreign entry. A folder without the marker (a run written before it existed)
is adopted only when it holds a run's config and nothing but carlrar's names; an empty folder is adopted as is.

One live run per folder: the main process holds an OS-level lock (``flock``) on ``LOCK`` inside it. The OS drops
the lock with the process, so ``kill -9`` leaves no stale lock; a second run refuses with the holder's PID.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import shutil
from pathlib import Path

from carlrar.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (everything else holds)
    fcntl = None

MARKER, LOCK, TMP = ".carlrar-run", ".carlrar-lock", ".carlrar-tmp"
# what ``carlrar train`` writes (checkpoint.py, train.py, models.py), including its temporary names
RUN_FILES = {"carlrar_config.yaml", "metrics.jsonl", "diagnostics.jsonl", "final_metrics.json", "checkpoint",
             "checkpoint.tmp", "checkpoint.old", "best.tmp", ".write-test", "carlrar_heads.safetensors",
             "carlrar_heads.json", MARKER, LOCK}
# the Hugging Face model and tokenizer files a run written before the marker may hold (the marker lists its own)
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
               "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja"}
# what evaluate / attack / generate write beside a model by default
RESULT_PATTERNS = ("eval_*.json", "attack_*.json", "generated_*.jsonl", "generated_*_summary.json", ".*" + TMP)

_held: dict[str, object] = {}  # resolved folder → the open lock file of this process


def recorded(out: Path) -> set[str]:
    """The names the marker lists as written by carlrar (empty without a readable marker)."""
    try:
        return set(json.loads((out / MARKER).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def is_own(name: str, listed: set[str]) -> bool:
    return (name in RUN_FILES or name in MODEL_FILES or name in listed
            or any(fnmatch.fnmatchcase(name, p) for p in RESULT_PATTERNS))


def check_ownership(out: Path, inputs: dict[str, str | None] = {}):  # noqa: B006 (read only)
    """Refuse, before anything is written, a folder carlrar may not train into: a file, a folder holding anything
    carlrar did not write, or one with carlrar's names but no proof they are its own. ``inputs`` (flag → path):
    data the run reads, which must not lie inside the folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a directory")
    resolved = out.resolve()
    for flag, path in inputs.items():
        if path and resolved in Path(path).resolve().parents:
            raise UserError(f"--{flag} {path} is inside the output directory {out}; carlrar never touches its input "
                            "files: choose another --output_dir")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK)  # a lock alone proves nothing either way
    listed = recorded(out)
    foreign = [n for n in names if not is_own(n, listed)]
    if foreign:
        raise UserError(f"{out} holds {foreign[0]!r}, which carlrar did not write; carlrar deletes or replaces only "
                        "its own files: move it or choose another --output_dir")
    run = "carlrar_config.yaml" in names and {"metrics.jsonl", "checkpoint", "final_metrics.json"} & set(names)
    if names and not (out / MARKER).exists() and not run:  # e.g. a model folder, or a config copied there
        raise UserError(f"{out} holds {names[0]!r}, not written by carlrar (no {MARKER} and no run beside it); "
                        "move it or choose another --output_dir")


def hold_lock(out: Path):
    """Take the folder's lock for this process (again: a no-op), or refuse with the holder's PID."""
    key = str(out.resolve())
    if key in _held or fcntl is None:
        return
    try:
        fh = open(out / LOCK, "a+")
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "unknown"
        fh.close()
        raise UserError(f"{out} is in use by another carlrar run (PID {pid}); wait for it to end or choose another "
                        "--output_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _held[key] = fh


def release_lock(out: Path):
    fh = _held.pop(str(out.resolve()), None)
    if fh is not None:
        fh.close()  # closing the last descriptor drops the flock


def mark(out: Path, files: list[str] = ()):
    """Write the marker (adopting the folder), adding ``files`` to the names it lists."""
    write_whole(out / MARKER, json.dumps({"files": sorted(recorded(out) | set(files))}))


def json_text(data, indent: int | None = None) -> str:
    """JSON with every non-finite number as null: ``json.dumps`` would write NaN / Infinity, which is not JSON."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x

    return json.dumps(finite(data), indent=indent, allow_nan=False)


def write_whole(path: Path, content):
    """Write ``content`` to ``path`` whole or not at all: to a temporary name beside it, then renamed over it. A failed
    write (full disk, read-only location, no permission) leaves no half-written file and is a one-line error.
    ``content`` is text, or a function that writes the file at the path it is given (a figure's ``savefig``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        content(tmp) if callable(content) else tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def clear_run(out: Path):
    """Remove every entry carlrar wrote except the marker and the lock (held: deleting it would let a second run
    lock a new file). Only called after ``check_ownership``, so everything else here is carlrar's."""
    listed = recorded(out)
    for p in out.iterdir():
        if p.name in (MARKER, LOCK) or not is_own(p.name, listed):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
