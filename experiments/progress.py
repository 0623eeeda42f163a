"""The runner's status table: counts, each running run's epoch, an overall ETA."""

import statistics
import time
from typing import Dict, Optional, Sequence

from experiments.plan import Run, checkpoint_epoch
from resnet_cifar.run_dir import count, hms


class Progress:
    """The status table: counts, each running run's epoch, and an overall ETA."""

    def __init__(self, runs: Sequence[Run], done_before: Sequence[str], log=print, every: float = 30.0):
        self.runs = {r.label: r for r in runs}
        self.status = {r.label: ("done" if r.label in done_before else "waiting") for r in runs}
        # Epochs each unfinished run still has to train: a waiting run may resume from a checkpoint.
        self.epochs_left = {r.label: r.train_epochs - checkpoint_epoch(r.run_dir)
                            for r in runs if r.label not in done_before}
        self.results: Dict[str, dict] = {}
        self.board: Dict[str, dict] = {}
        self.log = log
        self.every = every
        self.start = time.time()
        self._last_print = 0.0
        self._last_shown = None

    def finish(self, label: str, result: dict) -> None:
        self.results[label] = result
        self.status[label] = result["status"]
        if result["status"] == "done":
            trained = (f"; {count(result['epochs'], 'epoch')}, {result['epoch_seconds']:.0f} s each"
                       if result.get("epochs") and result.get("epoch_seconds") else "")
            self.log(f"done     {label} ({hms(result.get('seconds', 0))}{trained}"
                     + (f", {result['note']})" if result.get("note") else ")"))
        else:
            self.log(f"{result['status']:<8} {label}: {describe(result)}")

    def update(self, board: Dict[str, dict]) -> None:
        self.board = board
        for label, info in board.items():
            if self.status.get(label) in ("waiting", "running", "elsewhere", "retrying"):
                self.status[label] = info.get("state", "waiting")

    def counts(self) -> Dict[str, int]:
        out = dict.fromkeys(("done", "running", "waiting", "failed"), 0)
        for state in self.status.values():
            key = {"elsewhere": "running", "retrying": "running", "skipped": "failed"}.get(state, state)
            out[key] += 1
        return out

    def eta(self) -> Optional[float]:
        """Seconds left: the running runs' remaining epochs plus the waiting runs' (from their
        checkpoints on), spread over as many runs at once as are running now; None until some
        run has timed an epoch. Seconds per epoch: the finished runs' (over the epochs they
        trained here, since a resumed run's duration is not a whole run's), else the running
        runs'."""
        now = time.time()
        finished = [r["epoch_seconds"] for r in self.results.values()
                    if r["status"] == "done" and "note" not in r and r.get("epoch_seconds")]
        rates, left, untimed = [], [], 0     # untimed: epochs left of runs not timed yet
        for label, state in self.status.items():
            info = self.board.get(label, {})
            if state == "waiting":
                untimed += self.epochs_left[label]
            if state != "running":
                continue
            epochs = info.get("epoch", 0) - info.get("first_epoch", 0)
            if info.get("epoch_time") and epochs > 0:
                rate = (info["epoch_time"] - info["since"]) / epochs
                rates.append(rate)
                left.append(max(rate * (self.runs[label].train_epochs - info["epoch"])
                                - (now - info["epoch_time"]), 0.0))
            else:
                untimed += (self.runs[label].train_epochs - info["epoch"]) if "epoch" in info \
                    else self.epochs_left[label]
        if not (finished or rates):
            return None
        work = sum(left) + statistics.median(finished or rates) * untimed
        running = sum(s == "running" for s in self.status.values())
        return max(max(left, default=0.0), work / max(running, 1))

    def table(self, force: bool = False) -> None:
        shown = (tuple(sorted(self.status.items())),
                 tuple(sorted((k, v.get("epoch")) for k, v in self.board.items())))
        now = time.time()
        if not force and (shown == self._last_shown or now - self._last_print < self.every):
            return
        self._last_shown, self._last_print = shown, now
        c = self.counts()
        eta = self.eta()
        self.log(f"{len(self.status)} runs: {c['done']} done, {c['running']} running, {c['waiting']} waiting, "
                 f"{c['failed']} failed | elapsed {hms(now - self.start)} | "
                 + (f"time left {hms(eta)}, ETA {clock(now + eta)}" if eta is not None
                    else "ETA after the first timed epoch"))
        width = max((len(k) for k in self.status), default=0)
        for label, state in sorted(self.status.items()):
            if state not in ("running", "elsewhere", "retrying"):
                continue
            info = self.board.get(label, {})
            if state == "elsewhere":
                what = f"held by {info.get('holder')}: waiting for it"
            else:
                what = f"epoch {info.get('epoch', 0)}/{self.runs[label].train_epochs}"
                what += f" on {info['node']}" if info.get("node") else ""
                what += " (retrying)" if state == "retrying" else ""
            self.log(f"  {state:<9} {label:<{width}}  {what}")


def clock(when: float) -> str:
    """A local time of day, with the weekday when it is not today: 'Tue 20:16' or '14:05'."""
    fmt = "%H:%M" if time.localtime(when)[:3] == time.localtime()[:3] else "%a %H:%M"
    return time.strftime(fmt, time.localtime(when))


def describe(result: dict) -> str:
    parts = []
    if result.get("exit") is not None:
        parts.append(f"exit {result['exit']}")
    parts.append(result.get("error", ""))
    text = ": ".join(p for p in parts if p)
    return text + (f" (log {result['log']})" if result.get("log") else "")
