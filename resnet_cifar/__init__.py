"""resnet_cifar: the post's experiment on L2 weight decay and batch norm, in TF2 / Keras 3.

Importing the package keeps TensorFlow's C++ log lines off the console (the oneDNN notice,
CUDA probing such as the cuInit error on a machine without a GPU): TF_CPP_MIN_LOG_LEVEL=3
unless set, and the lines TensorFlow prints while it is imported are filtered the same way
(`quiet_tf`). TF_CPP_MIN_LOG_LEVEL=0 shows them all.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from resnet_cifar import quiet_tf  # noqa: E402

quiet_tf.install()
