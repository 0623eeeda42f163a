#!/bin/sh
# `docker run IMAGE --flag ...` trains (python -m resnet_cifar.train --flag ...);
# `docker run IMAGE tensorboard ...` (or any other command) runs that command.
set -e
case "${1:-}" in
  -*|"") exec python -m resnet_cifar.train "$@" ;;
  *) exec "$@" ;;
esac
