"""BN's lag at the ends of the learning-rate phases: the table `bn_lag.md` / `bn_lag.csv` of
`analysis.make_figures`.

For each run and seed evaluated by `analysis.precise_bn`, the test accuracy at the last epoch
of each learning-rate phase (the final one included), as logged (BN moving averages) and with
BN statistics recomputed from training batches: `precise_bn.json` for the final weights,
`precise_bn_epochN.json` for a checkpoint the trainer kept in `checkpoints/phase_ends/`.
"""

import os
from typing import Dict, List

import numpy as np

from analysis import output, precise_bn
from analysis.output import percent
from resnet_cifar import events, fidelity, tags
from resnet_cifar import runs as run_registry
from resnet_cifar.config import phase_end_epochs

TABLE = "bn_lag"


def rows(loaded: Dict[str, List[events.Run]]) -> List[dict]:
    """One row per run, seed and phase end (the last epoch of each learning-rate phase, the final
    one included) of the runs with any result on their own data: the accuracy logged at that epoch
    (BN moving averages) and, where evaluated, with recomputed BN statistics (precise_bn.json for
    the final weights, precise_bn_epochN.json for a kept checkpoint; None where not evaluated)."""
    out = []
    names = [n for n in run_registry.POST_RUNS if n in loaded] + sorted(set(loaded) - set(run_registry.POST_RUNS))
    for name in names:
        for run in loaded[name]:
            train_epochs = int(run.config.get("train_epochs", fidelity.TRAIN_EPOCHS))
            ends = phase_end_epochs(run.config.get("boundary_epochs", fidelity.BOUNDARY_EPOCHS), train_epochs)
            results = {}
            for epoch in (*ends, train_epochs):
                files = [precise_bn.read_result(run.run_dir, epoch=epoch)]
                if epoch == train_epochs:
                    files.insert(0, precise_bn.read_result(run.run_dir))          # the final weights' first
                usable = [r for r in files if r and r.get("epoch") == epoch and r.get("own_data", True)]
                if usable:
                    results[epoch] = usable[0]
            if not results:
                continue
            steps, values = run.scalars.get(tags.VALIDATION_DIR, {}).get(
                tags.EPOCH_ACCURACY, (np.empty(0), np.empty(0)))
            logged = {int(s): float(v) for s, v in zip(steps, values)}
            folder = os.path.basename(os.path.normpath(run.run_dir))
            seed = folder if folder.startswith("seed_") else ""        # a run stored as <name>/
            for epoch in (*ends, train_epochs):
                precise = results[epoch]["precise_bn"] if epoch in results else None
                out.append(dict(run=run_registry.LABELS.get(name, name), seed=seed, epoch=epoch,
                                train_epochs=train_epochs, logged=logged.get(epoch), precise_bn=precise))
    return out


def to_markdown(table: List[dict]) -> str:
    lines = ["| run | seed | epoch | logged test accuracy | recomputed BN statistics | recomputed − logged |",
             "|---|---|---:|---:|---:|---:|"]
    for r in table:
        gap = ("n/a" if r["logged"] is None or r["precise_bn"] is None
               else f"{100 * (r['precise_bn'] - r['logged']):+.2f} pts")
        lines.append(f"| {r['run']} | {r['seed']} | {r['epoch']} of {r['train_epochs']} | {percent(r['logged'])} | "
                     f"{percent(r['precise_bn'])} | {gap} |")
    lines += ["", "Test accuracy at the last epoch of each learning-rate phase, as logged (BN moving "
                  "averages) and with BN statistics recomputed from training batches "
                  "(`python -m analysis.precise_bn RESULTS --epoch=N` for a phase end the trainer kept in "
                  "checkpoints/phase_ends/, without --epoch for the final weights); n/a: not evaluated, "
                  "or not logged (yet, or at that epoch)."]
    return "\n".join(lines) + "\n"


def write(loaded: Dict[str, List[events.Run]], out_dir: str) -> List[str]:
    """bn_lag.md and bn_lag.csv when any run has a precise-BN result; returns their paths."""
    table = rows(loaded)
    if not table:
        return []
    return output.write_table(out_dir, TABLE, to_markdown(table), table)
