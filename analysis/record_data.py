"""Record what data runs trained on, in runs that were trained before runs recorded it.

    python -m analysis.record_data RESULTS_OR_RUN_DIR [...] --data_source=binary --data_dir=DIR

A run records its data's fingerprint in run_config.json ("data": per split the digest of
the decoded arrays, the digests of the files read, and whether they are the official
release: `resnet_cifar.cifar_data.fingerprint`). For a run trained before that, give the
data it trained on: the fingerprint is computed from it and added to the run's
run_config.json, nothing else changed, no retraining. A run that already records other
data is refused (exit 2); the same data again changes nothing.
"""

import json
import os
import sys

from analysis import precise_bn
from resnet_cifar import checkpoints, cifar_data, command_line, config as config_lib, tags
from resnet_cifar.command_line import ArgumentParser


def record_data(run_dir, data):
    """Adds the data's fingerprint to a run folder's run_config.json (a run trained before runs
    recorded it), nothing else changed. Refuses one that records other data."""
    path = os.path.join(run_dir, tags.RUN_CONFIG_FILE)
    with open(path) as f:
        payload = json.load(f)
    old = payload.get("data")
    if old and any(old.get(k) != data.get(k) for k in ("train", "test")):
        raise config_lib.ConfigError(f"{path} records other data ({old.get('name')}, train arrays "
                                     f"{old['train'].get('arrays_sha256', '?')[:12]}) than these")
    payload["data"] = data
    checkpoints.write_json(path, payload)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m analysis.record_data",
                            description="Add the data's fingerprint to runs trained before runs recorded it.")
    parser.add_argument("paths", nargs="+", metavar="RESULTS_OR_RUN_DIR",
                        help="run folders, or folders to search for them")
    parser.add_argument("--data_source", choices=[s for s in cifar_data.SOURCES if s != "synthetic"],
                        required=True, help="the data the runs trained on")
    parser.add_argument("--data_dir", default=None, help="as the runs were given it")
    args = parser.parse_args(argv)
    try:
        folders = precise_bn.run_folders(args.paths)
        arrays = cifar_data.load_arrays(args.data_source, args.data_dir)
        data = cifar_data.fingerprint(arrays, args.data_source, args.data_dir)
        for folder, name in folders:
            record_data(folder, data)
            print(f"{name}: {data['name']} (train arrays {data['train']['arrays_sha256'][:12]}, "
                  f"test arrays {data['test']['arrays_sha256'][:12]})")
    except (precise_bn.EvaluationError, cifar_data.DataError, config_lib.ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    command_line.run(main)
