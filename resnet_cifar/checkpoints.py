"""Checkpoints that survive damage: restore the newest one that reads back whole.

`tf.train.CheckpointManager` trusts its small `checkpoint` index file: garbage in
it made a run start afresh, and its rotation then deleted the intact earlier
checkpoint. Here the files themselves are the truth:

- restore lists every `ckpt-N.*` on disk, newest first, reads each variable of
  ckpt-N back (the bundle reader checks sizes and CRCs, so a truncated or
  corrupted data file or a missing index is caught) and restores the first that
  reads back whole, saying which newer ones were skipped and why (and rewrites
  the index if it named another). When files exist but none reads back, the run
  is refused: never a silent fresh start. One exception: a checkpoint newer than the
  one the index names (or with no index at all) that lacks its `.index` is a save
  killed before it finished (TensorFlow writes the `.index` last, and the index after
  it), not damage; skipped like the others, it does not make a run that has no older
  checkpoint refuse to start (a kill during the first save), and the logs are still
  checked against the checkpoint restored (`run_dir.check_checkpoints_cover_the_logs`).
- save writes ckpt-N (TensorFlow writes to a temporary name and renames), reads
  it back, then rewrites the index (atomically), and only then deletes
  checkpoints other than ckpt-N and the previous good one. A failed save (full
  disk) deletes nothing but its own partial files.
- the checkpoints of the epochs that end a learning-rate phase (`phase_ends`, e.g.
  ckpt-50 and ckpt-100 of the post's schedule) are also copied into `phase_ends/`
  beside the rotation, which restore never reads: they stay for analysis
  (`analysis.precise_bn --epoch=50`: how much of the test accuracy at the end of a
  phase is batch norm's lag). A copy is staged, read back whole, then renamed into
  place, the `.index` last. It is secondary to training: a failed copy is a
  warning, never a failed save, and the rotation keeps a phase end until its copy
  exists, so every later save tries again (a kill during a copy loses nothing). The
  first save of a fresh start drops copies another trajectory left.
- a checkpoint carries its run's identity (`identity`: the seed and a digest of the
  settings, `run_dir.identity`) under the name `run`. Restore refuses one whose identity
  is another run's, whatever its file names: another seed's checkpoint copied into a
  stopped run's folder would otherwise resume as this run. A checkpoint written before
  identities existed has none and restores as before.
"""

import contextlib
import json
import os
import re
import shutil
import sys
from typing import Iterable, List, Optional, Tuple


INDEX_FILE = "checkpoint"            # tf.train.latest_checkpoint's index, kept for other tools
PREFIX = "ckpt"
KEEP = 2
PHASE_ENDS = "phase_ends"           # sub-folder of kept phase-end checkpoints
_FILE_RE = re.compile(rf"^{PREFIX}-(\d+)(\.|_temp)")


class NothingReadable(RuntimeError):
    """Checkpoint files exist but none reads back; the message is one line."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the message is one line."""


def name(number: int) -> str:
    return f"{PREFIX}-{number}"


def indexed(directory: str) -> Optional[str]:
    """The checkpoint the index of `directory` names (e.g. ckpt-7), if it can be read."""
    try:
        with open(os.path.join(directory, INDEX_FILE)) as f:
            found = re.search(r'^model_checkpoint_path: "([^"]*)"', f.read(), re.M)
    except (OSError, UnicodeDecodeError):
        return None
    return os.path.basename(found.group(1)) if found else None


def indexed_number(directory: str) -> Optional[int]:
    """The number of the checkpoint the index names (7 for ckpt-7), or None."""
    match = re.fullmatch(rf"{PREFIX}-(\d+)", indexed(directory) or "")
    return int(match.group(1)) if match else None


def numbers_on_disk(directory: str) -> List[int]:
    """Numbers of every checkpoint with any file on disk, newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted({int(m.group(1)) for m in map(_FILE_RE.match, names) if m}, reverse=True)


def _short(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


def unreadable_reason(prefix: str) -> Optional[str]:
    """None if every variable of the checkpoint at `prefix` reads back, else why not."""
    if not os.path.exists(prefix + ".index"):
        return "its .index file is missing"
    try:
        import tensorflow as tf     # here, not at the top: the runner reads the index without TF

        reader = tf.train.load_checkpoint(prefix)
        for variable in reader.get_variable_to_shape_map():
            reader.get_tensor(variable)
    except Exception as e:    # the reader raises OpErrors, IndexError, ValueError...
        return f"{type(e).__name__}: {_short(e)}"
    return None


IDENTITY_KEY = "run/.ATTRIBUTES/VARIABLE_VALUE"     # the identity's entry in a checkpoint


class ForeignCheckpoint(RuntimeError):
    """A checkpoint written by another run (its identity is not this run's)."""


def identity_of(prefix: str) -> Optional[str]:
    """The run identity ckpt-N carries, None for one written without."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    if IDENTITY_KEY not in reader.get_variable_to_shape_map():
        return None
    value = reader.get_tensor(IDENTITY_KEY)
    return value.decode() if isinstance(value, bytes) else str(value)


class CheckpointStore:
    """Saves and restores `checkpoint` (a tf.train.Checkpoint) as DIR/ckpt-N; with `identity`,
    each checkpoint carries it and restore refuses another run's."""

    def __init__(self, checkpoint, directory: str, keep: int = KEEP, phase_ends: Iterable[int] = (),
                 identity: Optional[str] = None):
        self.checkpoint = checkpoint
        self.identity = identity
        self.directory = directory
        self.keep = keep
        self.phase_ends = frozenset(int(n) for n in phase_ends)
        self.good: List[int] = []      # checkpoints known to read back whole, oldest first
        self._warned = set()           # phase ends whose failed copy was reported
        # Checkpoint.save() (and so CheckpointManager) records a save counter; write()
        # records it only once it exists: create it, so both kinds of files match.
        checkpoint.save_counter  # noqa: B018

    def prefix(self, number: int) -> str:
        return os.path.join(self.directory, name(number))

    def restore(self) -> Tuple[int, List[Tuple[str, str]]]:
        """Restores the newest checkpoint that reads back whole.

        Returns (its number or 0 if there are none, [(skipped name, reason), ...]).
        Raises NothingReadable if checkpoint files exist but none can be restored.
        """
        skipped, damaged = [], False
        committed = indexed_number(self.directory) or 0
        for number in numbers_on_disk(self.directory):
            prefix = self.prefix(number)
            reason = unreadable_reason(prefix)
            if reason is not None and number > committed and not os.path.exists(prefix + ".index"):
                skipped.append((name(number), f"an unfinished save ({reason})"))
                continue
            if reason is None and self.identity is not None:
                theirs = identity_of(prefix)
                if theirs is not None and theirs != self.identity:
                    raise ForeignCheckpoint(f"{prefix} was written by another run ({theirs}), not this "
                                            f"one ({self.identity})")
            if reason is None:
                try:
                    # expect_partial: the identity is read above, not restored into anything.
                    self.checkpoint.restore(prefix).assert_existing_objects_matched().expect_partial()
                except Exception as e:    # noqa: BLE001 (shape/name mismatches of any kind)
                    reason = "it does not match this model: " + _short(e)
            if reason is None:
                self.good = [number]
                if self._indexed() != name(number):      # damaged, or naming a skipped one
                    self._write_index(self.good)
                return number, skipped
            skipped.append((name(number), reason))
            damaged = True
        if damaged:
            raise NothingReadable(
                f"no checkpoint in {self.directory} reads back whole ("
                + "; ".join(f"{n}: {r}" for n, r in skipped) + ")")
        return 0, skipped

    def save(self, checkpoint_number: int) -> str:
        """Writes, verifies, indexes ckpt-N; then deletes all but it and the previous good one."""
        import tensorflow as tf

        number = checkpoint_number
        prefix = self.prefix(number)
        last = f"the last good checkpoint {name(self.good[-1])} is kept" if self.good \
            else "no earlier checkpoint exists"
        if not self.good:
            # The first save of a fresh start: copies kept from another trajectory (its rotation
            # deleted by hand) would pass for this one's. Here, not in restore: a run refused
            # after restore keeps its folder as it was.
            shutil.rmtree(os.path.join(self.directory, PHASE_ENDS), ignore_errors=True)
        try:
            os.makedirs(self.directory, exist_ok=True)
            self.checkpoint.save_counter.assign(number)
            if self.identity is not None:
                self.checkpoint.run = tf.Variable(self.identity, trainable=False)
            try:
                self.checkpoint.write(prefix)
            finally:
                if self.identity is not None:
                    del self.checkpoint.run     # restore never binds it: see identity_of
            reason = unreadable_reason(prefix)
            if reason is not None:
                raise SaveError(f"{name(number)} did not read back whole ({reason})")
            good = ([n for n in self.good if n != number] + [number])[-self.keep:]
            self._write_index(good)
        except (tf.errors.OpError, OSError, SaveError) as e:
            self._remove(number)
            raise SaveError(f"could not save checkpoint {name(number)} in {self.directory} "
                            f"({_short(e)}); {last}; free space and run the same command "
                            "to resume") from None
        self.good = good
        on_disk = numbers_on_disk(self.directory)
        kept = {n for n in self.phase_ends.intersection(on_disk) if self._keep_phase_end(n)}
        for other in on_disk:
            if other not in self.good and (other not in self.phase_ends or other in kept):
                self._remove(other)
        return prefix

    def _keep_phase_end(self, number: int) -> bool:
        """Copies ckpt-N into phase_ends/ unless it is there; True once it is. A failure is one
        warning line (once per checkpoint), and False: the rotation keeps ckpt-N to try again."""
        folder = os.path.join(self.directory, PHASE_ENDS)
        staging = os.path.join(folder, f".staging-{name(number)}")     # not a ckpt-N name
        try:
            if not os.path.exists(os.path.join(folder, name(number) + ".index")):
                shutil.rmtree(staging, ignore_errors=True)
                os.makedirs(staging)
                files = sorted((e for e in os.listdir(self.directory) if e.startswith(name(number) + ".")),
                               key=lambda e: e.endswith(".index"))           # the .index last
                for entry in files:
                    shutil.copy2(os.path.join(self.directory, entry), staging)
                reason = unreadable_reason(os.path.join(staging, name(number)))
                if reason is not None:
                    raise OSError(f"the copy did not read back whole ({reason})")
                for entry in files:
                    os.replace(os.path.join(staging, entry), os.path.join(folder, entry))
            shutil.rmtree(staging, ignore_errors=True)
            return True
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if number not in self._warned:
                self._warned.add(number)
                print(f"warning: could not keep {name(number)} (the end of a learning-rate phase) in "
                      f"{folder} ({_short(e)}); training goes on, and the next save tries again",
                      file=sys.stderr, flush=True)
            return False

    def _indexed(self) -> Optional[str]:
        return indexed(self.directory)

    def _write_index(self, good: List[int]) -> None:
        """The CheckpointState text proto that tf.train.latest_checkpoint reads, atomically."""
        lines = [f'model_checkpoint_path: "{name(good[-1])}"']
        lines += [f'all_model_checkpoint_paths: "{name(n)}"' for n in good]
        path = os.path.join(self.directory, INDEX_FILE)
        if os.path.isdir(path) and not os.path.islink(path):    # a damaged index like any other
            shutil.rmtree(path)
        with atomic_open(path) as f:
            f.write("\n".join(lines) + "\n")

    def _remove(self, number: int) -> None:
        base = name(number)
        for entry in os.listdir(self.directory):
            if entry.startswith(base + ".") or entry.startswith(base + "_temp"):
                path = os.path.join(self.directory, entry)
                try:
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.remove(path)
                except OSError:
                    pass


# ----------------------------------------------------------------------------- files that appear whole

# Files that appear whole or not at all: written to a temporary file beside them, flushed
# to disk, then renamed over the target. A kill or a full disk leaves the old file (or none),
# never a half-written or empty one. One helper for every file this project writes itself:
# run_config.json, done.json, the final weights, the checkpoint index, conv_channel_sqsum.npz, precise_bn.json,
# the analysis tables and figures.

@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path beside `path`, with the same ending (Keras wants `.weights.h5`), renamed
    over `path` when the block succeeds; for writers that take a path, not a file."""
    folder, name = os.path.split(path)
    stem, dot, ending = name.partition(".")          # final.weights.h5 -> final.tmp9.weights.h5
    tmp = os.path.join(folder, f"{stem}.tmp{os.getpid()}{dot}{ending}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
    """`open(path, mode)` for writing, as a temporary file renamed over `path` on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, payload) -> None:
    with atomic_open(path) as f:
        json.dump(payload, f, indent=2, sort_keys=True)
