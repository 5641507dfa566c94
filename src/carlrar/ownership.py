"""Who owns an output location: what carlrar may delete or replace there, and the one live run it may hold.

carlrar deletes or replaces only what it can prove it wrote. A folder it trains into carries ``MARKER`` (written
when carlrar made or adopted an empty folder, and listing the model files ``save_best`` moved in); within it only
carlrar's own names are ever removed, and a folder of carlrar's name (``checkpoint/``) only when everything in it
is carlrar's too. A folder holding anything else is refused, with or without ``--overwrite``, by a one-line error
naming the first foreign entry. A folder without the marker is never taken for a run, whatever its names (a copied
config, a run from before the marker): the user deletes it. Nor is a command's input ever its output.

One live run per folder: the main process holds an OS-level lock (``flock``) on ``LOCK`` inside it, released when
the run ends however it ends (``locked``). The OS drops the lock with the process, so ``kill -9`` leaves no stale
lock; a second run refuses with the holder's PID. Without ``fcntl`` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import errno
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
# safetensors (Rust's tempfile crate) writes a file as ".tmp" + 6 characters, then renames it: a kill -9 mid-save
# leaves one behind, in the run folder or in one of its checkpoint folders
SAFETENSORS_TMP = ".tmp??????"
# what evaluate / attack / generate write beside a model by default
RESULT_PATTERNS = ("eval_*.json", "attack_*.json", "generated_*.jsonl", "generated_*_summary.json", ".*" + TMP,
                   SAFETENSORS_TMP)
# what carlrar's folders hold: accelerate's save_state and checkpoint.py's files; the model files of ``save_best``
CHECKPOINT_PATTERNS = ("optimizer*.bin", "scheduler*.bin", "sampler*.bin", "dl_state_dict*.bin", "random_states_*.pkl",
                       "scaler*.pt", "custom_checkpoint_*.pkl", "model*.safetensors", "pytorch_model*.bin",
                       "method_state.safetensors", "trainer_state.json", "trainer_state.json.part", SAFETENSORS_TMP)
FOLDERS = {"checkpoint": CHECKPOINT_PATTERNS, "checkpoint.tmp": CHECKPOINT_PATTERNS,
           "checkpoint.old": CHECKPOINT_PATTERNS, "best.tmp": (*MODEL_FILES, "carlrar_heads.*", SAFETENSORS_TMP)}

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


def foreign_entry(out: Path, listed: set[str]) -> str | None:
    """The first entry of ``out`` carlrar did not write (a path relative to it), or None."""
    return next((f for p in entries(out) if p.name != LOCK for f in [foreign_in(p, listed)] if f), None)


def foreign_in(p: Path, listed: set[str]) -> str | None:
    """``p``'s name when carlrar did not write it (a name not carlrar's, a folder where carlrar writes a file or the
    reverse, a symbolic link: carlrar makes none), or the first thing inside one of carlrar's folders that is not
    carlrar's (a user's file in ``checkpoint/``)."""
    if not is_own(p.name, listed) or p.is_symlink() or p.is_dir() != (p.name in FOLDERS):
        return p.name
    for q in entries(p) if p.is_dir() else []:
        if q.is_dir() or q.is_symlink() or not (q.name in listed
                                                or any(fnmatch.fnmatchcase(q.name, o) for o in FOLDERS[p.name])):
            return f"{p.name}/{q.name}"
    return None


def entries(folder: Path) -> list[Path]:
    """A folder's entries; one that another run removed meanwhile is simply not there."""
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def refuse_input(out: Path, inputs: dict[str, str | None], flag: str):
    """Refuse an output (``--flag out``) that is one of the command's inputs (flag → path) or holds one: the same
    path however spelled, a hard link to it (``samefile``), or a folder it lies in."""
    for name, path in inputs.items():
        if not path:
            continue
        target = Path(path).resolve()
        same = out.resolve() == target
        with contextlib.suppress(OSError):
            same = same or (out.exists() and os.path.samefile(out, path))
        if same or out.resolve() in target.parents:
            raise UserError(f"--{name} {path} is {'' if same else 'inside '}the --{flag} {out}; carlrar never "
                            f"writes over its input files: choose another --{flag}")


def check_ownership(out: Path, inputs: dict[str, str | None] = {}):  # noqa: B006 (read only)
    """Refuse, before anything is written, a folder carlrar may not train into: a file, a folder holding anything
    carlrar did not write, or one without the marker that proves its contents carlrar's (an empty one is adopted).
    ``inputs`` (flag → path): data the run reads, which must not lie inside the folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a directory")
    refuse_input(out, inputs, "output_dir")
    if not out.is_dir():
        return
    foreign = foreign_entry(out, recorded(out))
    if foreign:
        raise UserError(f"{out} holds {foreign!r}, which carlrar did not write; carlrar deletes or replaces only "
                        "its own files: move it or choose another --output_dir")
    names = [p.name for p in entries(out) if p.name != LOCK]  # a lock alone proves nothing either way
    if names and MARKER not in names:  # a copied config, or a run from before the marker: nothing proves it ours
        raise UserError(f"{out} holds {names[0]!r} but no {MARKER}, so carlrar cannot prove it wrote it (a copy, or "
                        "a run of an older carlrar): delete the folder yourself or pass a fresh --output_dir")


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


@contextlib.contextmanager
def locked(out: Path, take: bool = True):
    """Hold the folder's lock (``take``; else whatever the block takes) until the block exits, however it exits:
    a search prunes a trial by raising, and the folder must not stay locked for the rest of the process. A lock
    this process held before the block stays held."""
    before = str(out.resolve()) in _held
    try:
        if take:
            hold_lock(out)
        yield
    finally:
        if not before:
            release_lock(out)


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


def cannot_write(path: Path, e: Exception, what: str = "") -> UserError:
    """The one-line error for a failed write of ``path``. Libraries that write through their own code hide the
    errno of a full disk (safetensors: "IoError(... StorageFull ...)", torch's zip writer: "unexpected pos"), so a
    disk with (almost) no room left is named as such; otherwise the error's first line."""
    text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    if not isinstance(e, OSError) and ("StorageFull" in text or os.strerror(errno.ENOSPC) in text or disk_full(path)):
        text = os.strerror(errno.ENOSPC)
    return UserError(f"cannot write {what}{path}: {text.splitlines()[0][:200]}")


def disk_full(path: Path) -> bool:
    existing = next((p for p in (Path(path), *Path(path).absolute().parents) if p.exists()), Path("/"))
    try:
        return shutil.disk_usage(existing).free < 2**20
    except OSError:
        return False


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
        raise cannot_write(path, e) from None


def clear_run(out: Path):
    """Remove every entry carlrar wrote except the marker and the lock (held: deleting it would let a second run
    lock a new file). Called after ``check_ownership``; each folder is checked again as it goes (``remove_own``)."""
    listed = recorded(out)
    for p in entries(out):
        if p.name not in (MARKER, LOCK) and is_own(p.name, listed):
            remove_own(p, listed)


def remove_own(p: Path, listed: set[str] = frozenset()):
    """Remove one of carlrar's entries, a folder only when everything in it is carlrar's (else a one-line error
    naming what is not): a user's file never goes with it."""
    if not (p.exists() or p.is_symlink()):
        return
    foreign = foreign_in(p, listed)
    if foreign:
        raise UserError(f"{p.parent} holds {foreign!r}, which carlrar did not write; carlrar deletes or replaces "
                        "only its own files: move it or choose another --output_dir")
    shutil.rmtree(p) if p.is_dir() else p.unlink()
