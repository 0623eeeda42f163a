# The reproduction on a GPU: tensorflow/tensorflow:2.21.0-gpu carries TF 2.21 and the CUDA it needs.
# docs/container.md has the commands; in short:
#   docker build -t resnet-cifar .
#   docker run --rm resnet-cifar                       # help
#   docker run --rm --gpus all --user $(id -u):$(id -g) -v $PWD/runs:/runs -v $PWD/tfds:/data/tfds \
#       resnet-cifar --flag_noconv_l2                  # trains into runs/noconv_l2
#   docker run --rm -p 6006:6006 -v $PWD/runs:/runs resnet-cifar tensorboard --logdir /runs --bind_all
# Ray (from requirements.txt) makes a container a node of a sweep cluster (deploy/, docs/sweeps.md):
#   docker run --rm --gpus all --network host --shm-size=8g -v /shared:/shared resnet-cifar ray start --head --block
#   docker run --rm --gpus all --network host --shm-size=8g -v /shared:/shared resnet-cifar ray start --address=HEAD:6379 --block
# docker/check_image.sh builds this image and runs the help, a short --flag_noconv_l2 run and
# prepare-cifar10 without a network in it (docs/container.md).
FROM tensorflow/tensorflow:2.21.0-gpu

# TensorFlow's images are built with Python 3.11 (tensorflow/tools/dockerfiles); the pins
# need 3.11 or newer (pyproject.toml), so a base image with an older one stops here, in
# one line, rather than in pip's "no matching distribution" for numpy.
RUN python -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
    'resnet_cifar needs Python 3.11 or newer; this base image has ' + sys.version.split()[0])"

# CIFAR-10 is downloaded once into /data/tfds: mount it (-v HOST_DIR:/data/tfds) to keep it.
# HOME=/tmp: with --user UID:GID (no passwd entry, HOME would be /, not writable) Keras,
# matplotlib and Ray still find a writable home. TF_CPP_MIN_LOG_LEVEL=3: TensorFlow's C++
# start-up lines (oneDNN notice, cuInit error without --gpus, CUDA stub and plugin lines)
# stay out of every process's console; -e TF_CPP_MIN_LOG_LEVEL=0 brings them back. TF 2.21
# logs some of them before it reads the variable: resnet_cifar/__init__.py, loaded in every
# Python process by a .pth line (below), drops those.
ENV TFDS_DATA_DIR=/data/tfds \
    HOME=/tmp \
    TF_CPP_MIN_LOG_LEVEL=3 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/resnet_cifar
# Dependencies first, so code edits do not reinstall them: the runtime part of
# requirements.txt only (everything above its "# Tests" line; the tests are not in the
# image, so neither is pytest). tensorflow==2.21.0 is already in the image, so pip keeps it.
COPY requirements.txt /tmp/requirements.txt
RUN sed '/^# Tests/,$d' /tmp/requirements.txt > /tmp/runtime-requirements.txt \
    && python -m pip install -r /tmp/runtime-requirements.txt \
    && rm /tmp/requirements.txt /tmp/runtime-requirements.txt

COPY pyproject.toml README.md ./
COPY resnet_cifar/ resnet_cifar/
COPY experiments/ experiments/
COPY analysis/ analysis/
COPY docker/entrypoint.sh /usr/local/bin/resnet-cifar-entrypoint
COPY docker/prepare_cifar10.py /usr/local/bin/prepare-cifar10
# /runs and /data/tfds are writable by any --user, so a run works even without a mount
# (its outputs then go with the container). No VOLUME: with `docker run --rm` an
# anonymous volume would be left behind by every run that mounts nothing there.
RUN python -m pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && chmod 755 /usr/local/bin/resnet-cifar-entrypoint /usr/local/bin/prepare-cifar10 \
    && site_dir=$(python -c "import site; print(site.getsitepackages()[0])") \
    && echo "import resnet_cifar" > "$site_dir/resnet_cifar_quiet_tf.pth" \
    && mkdir -p /data/tfds /runs \
    && chmod 1777 /data/tfds /runs

# Ray: GCS and client server (ray://HOST:10001), when --network host is not used.
EXPOSE 6379 10001
# Flags go to the training app (without --model_dir, into /runs/NAME, NAME named after
# the flags); no arguments print the help; a command (tensorboard, python, ray, bash,
# prepare-cifar10) runs as given.
ENTRYPOINT ["/usr/local/bin/resnet-cifar-entrypoint"]
CMD []
