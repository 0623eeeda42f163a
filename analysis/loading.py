"""The runs of a results folder, read once: what the analysis commands read event logs with.

`load_results` reads the run folders `events.find_runs` found, names the data for the
figures' subtitles (--data_name) and gives folders not named after a run the name their
run_config.json describes (`recognise`); `read_runs` is its reading alone.
"""

from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

from analysis import figures
from resnet_cifar import events
from resnet_cifar import runs as run_registry


def read_runs(found: Mapping[str, Sequence[str]]) -> Iterator[Tuple[str, events.Run]]:
    """(name, run) of each run folder of `found` (name -> folders), read as it is reached;
    an unreadable one is skipped with a note."""
    for name, run_dirs in found.items():
        for run_dir in run_dirs:
            try:
                run = events.load_run(run_dir)
            except events.EventsError as e:
                figures.note(f"skipped {run_dir}: {e}")
                continue
            yield name, run


def load_results(runs: Dict[str, List[str]], data_name: str = "") -> Dict[str, List[events.Run]]:
    """Read every run folder once; an unreadable one is skipped with a note. The data is named
    in every figure's subtitle (figures.DATA_NAME) by `data_name` if given, else by what the
    run recorded of its data ("official CIFAR-10", "CIFAR-10 layout, not the official
    files", ...: `cifar_data.fingerprint`), else by its data source."""
    loaded = {}
    for name, run in read_runs(runs):
        for damage in run.damaged:
            figures.note(f"damaged event file {damage}; read up to the damage, run marked incomplete")
        named = data_name or (events.recorded_data(run.run_dir) or {}).get("name")
        if named:
            run.config = dict(run.config, **{figures.DATA_NAME: named})
        loaded.setdefault(name, []).append(run)
    return recognise(loaded)


def recognise(loaded: Dict[str, List[events.Run]]) -> Dict[str, List[events.Run]]:
    """Folders not named after a run (runs/a, runs/b) take the name of the run their
    run_config.json describes (`runs.name_of`), when no other folder has that name."""
    out = {}
    for name, seeds in loaded.items():
        guess = None if name in run_registry.LABELS else run_registry.name_of(seeds[0].config)
        if guess and guess not in loaded and guess not in out:
            figures.note(f"{name}: recognised as {figures.label_of(guess)} ({guess}) by its run_config.json")
            name = guess
        out[name] = seeds
    return out
