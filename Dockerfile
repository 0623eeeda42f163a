# The reproduction on a GPU: tensorflow/tensorflow:2.21.0-gpu carries TF 2.21 and the CUDA it needs.
#   docker build -t resnet-cifar .
#   docker run --gpus all -v $PWD/runs:/runs -v $PWD/tfds:/data/tfds resnet-cifar \
#       --noconv_l2 --model_dir=/runs/noconv_l2
#   docker run -p 6006:6006 -v $PWD/runs:/runs resnet-cifar tensorboard --logdir /runs --bind_all
# Ray (from requirements.txt) makes a container a node of a sweep cluster (deploy/, README "Sweeps"):
#   docker run --gpus all --network host --shm-size=8g -v /shared:/shared resnet-cifar ray start --head --block
#   docker run --gpus all --network host --shm-size=8g -v /shared:/shared resnet-cifar ray start --address=HEAD:6379 --block
FROM tensorflow/tensorflow:2.21.0-gpu

# TensorFlow's images are built with Python 3.11 (tensorflow/tools/dockerfiles); the pins
# need 3.11 or newer (pyproject.toml), so a base image with an older one stops here, in
# one line, rather than in pip's "no matching distribution" for numpy.
RUN python -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
    'resnet_cifar needs Python 3.11 or newer; this base image has ' + sys.version.split()[0])"

# CIFAR-10 is downloaded once into this folder: mount it (-v HOST_DIR:/data/tfds) to keep it.
ENV TFDS_DATA_DIR=/data/tfds \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/resnet_cifar
# Dependencies first, so code edits do not reinstall them. tensorflow==2.21.0 is
# already in the image, so pip keeps it.
COPY requirements.txt .
RUN python -m pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY resnet_cifar/ resnet_cifar/
COPY experiments/ experiments/
COPY analysis/ analysis/
COPY docker/entrypoint.sh /usr/local/bin/resnet-cifar-entrypoint
RUN python -m pip install --no-deps . \
    && chmod +x /usr/local/bin/resnet-cifar-entrypoint \
    && mkdir -p /data/tfds /runs

VOLUME ["/data/tfds", "/runs"]
# Ray: GCS and client server (ray://HOST:10001), when --network host is not used.
EXPOSE 6379 10001
# Flags go straight to the training app; a command (tensorboard, python, bash) runs as given.
ENTRYPOINT ["/usr/local/bin/resnet-cifar-entrypoint"]
CMD ["--helpshort"]
