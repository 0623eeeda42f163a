#!/usr/bin/env python3
"""prepare-cifar10: download and prepare CIFAR-10 into $TFDS_DATA_DIR (/data/tfds in the image).

    docker run --rm --user $(id -u):$(id -g) -v $PWD/tfds:/data/tfds resnet-cifar prepare-cifar10

It takes the trainer's own path for `--data_source=tfds` (resnet_cifar.cifar_data): a
quick connection check first, so that without a network it stops within seconds, in one
line, instead of after minutes of TFDS's retries. An already prepared folder is reused.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A command of the image: data errors say what to mount (resnet_cifar.cifar_data.offline_advice).
os.environ.setdefault("RESNET_CIFAR_CONTAINER_RUNS", "/runs")


def main(argv):
    if len(argv) > 1:
        print(__doc__.strip())
        return 0 if argv[1] in ("-h", "--help") else 2
    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    from resnet_cifar import cifar_data

    try:
        arrays = cifar_data.load_arrays("tfds", data_dir)
    except cifar_data.DataError as e:
        print(f"prepare-cifar10: {e}", file=sys.stderr)
        return 2                   # as the trainer for the same error
    except KeyboardInterrupt:
        print("prepare-cifar10: interrupted; run it again to finish", file=sys.stderr)
        return 130
    print(f"CIFAR-10 is ready in {data_dir or 'the TFDS default folder'}: "
          f"{len(arrays.train_labels)} training and {len(arrays.test_labels)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
