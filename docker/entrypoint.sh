#!/bin/sh
# The image's entrypoint (docs/container.md):
#   docker run IMAGE                 this help and the training flags; exit 0
#   docker run IMAGE --flag ...      trains: python -m resnet_cifar.train --flag ...; without
#                                    --model_dir the run goes to /runs/NAME, NAME named after
#                                    the run the flags describe (run_name below)
#   docker run IMAGE COMMAND ...     runs COMMAND (python, tensorboard, ray, bash, prepare-cifar10)
# RESNET_CIFAR_RUNS moves the default's parent folder (/runs).
set -e

runs=${RESNET_CIFAR_RUNS:-/runs}

usage() {
  cat <<'EOF'
resnet-cifar: ResNet-20 on CIFAR-10, the runs of "L2 regularization and batch norm".

  docker run --rm --gpus all --user $(id -u):$(id -g) -v $PWD/runs:/runs -v $PWD/tfds:/data/tfds \
      resnet-cifar --flag_noconv_l2                    trains into runs/noconv_l2
  docker run --rm resnet-cifar COMMAND ...             runs COMMAND: python -m experiments.run_all,
                                                       tensorboard, prepare-cifar10, ray, bash

Without --model_dir a run goes to /runs/NAME, named after its flags: baseline, noconv_l2,
conv_lr_scale, conv_lr_scale_bn098, ... (docs/container.md); give --model_dir to choose.

Training flags (python -m resnet_cifar.train):
EOF
  exec python -c 'from absl import flags; import resnet_cifar.train as t; print(flags.FLAGS.module_help(t))'
}

# absl's booleans: --x, --nox, --x=true|false|t|f|1|0 (any case). Prints 1 or 0.
truth() {
  case $1 in
    "") echo 1 ;;
    [Ff]|[Ff][Aa][Ll][Ss][Ee]|0) echo 0 ;;
    *) echo 1 ;;
  esac
}

# The folder name of the run that the arguments describe:
# - with --flagfile=PATH: the file's name without .flags (experiments/full/noconv_l2.flags:
#   noconv_l2); a preset other than full is put first (experiments/quick/noconv_l2.flags:
#   quick_noconv_l2);
# - else from the flags: baseline; noconv_l2; conv_lr_scale (--noconv_l2 --conv_grad_scale;
#   conv_lr_scale_conv_l2 with the conv kernels still in L2), then _FACTOR for a
#   --conv_lr_factor other than piecewise (conv_lr_scale_per_layer); then _bnDIGITS for a
#   --bn_decay other than 0.997 (0.98: _bn098); --optimizer=adam|adamw and
#   --resnet_size=N (not 20) in front: adam_noconv_l2, resnet32_baseline;
# - either way, _synthetic for --data_source=synthetic (a smoke run never takes the real
#   run's folder), then _seedN at the end for a --seed other than 0.
# Other flags (epochs, steps, data source, learning rate, ...) do not change the name: the
# trainer refuses to put a run into a folder that holds a run with other flags.
run_name() {
  conv_l2=1 flag_noconv=0 grad=0 factor=piecewise bn=0.997 opt=momentum size=20 seed=0 flagfile= source=
  while [ $# -gt 0 ]; do
    arg=$1
    shift
    case $arg in
      --) break ;;
      --*) arg=${arg#--} ;;
      -*) arg=${arg#-} ;;
      *) continue ;;
    esac
    name=${arg%%=*}
    case $arg in
      *=*) value=${arg#*=} ;;
      *)
        value=
        case $name in      # flags with a value, also spelled `--name value`
          bn_decay|conv_lr_factor|optimizer|resnet_size|seed|flagfile|data_source)
            if [ $# -gt 0 ]; then value=$1; shift; fi ;;
        esac ;;
    esac
    case $name in
      conv_l2) conv_l2=$(truth "$value") ;;
      noconv_l2) conv_l2=0 ;;
      flag_noconv_l2) flag_noconv=$(truth "$value") ;;
      noflag_noconv_l2) flag_noconv=0 ;;
      conv_grad_scale) grad=$(truth "$value") ;;
      noconv_grad_scale) grad=0 ;;
      conv_lr_factor) factor=$value ;;
      bn_decay) bn=$value ;;
      optimizer) opt=$value ;;
      resnet_size) size=$value ;;
      seed) seed=$value ;;
      flagfile) flagfile=$value ;;
      data_source) source=$value ;;
    esac
  done
  if [ "$flag_noconv" = 1 ]; then conv_l2=0; fi

  if [ -n "$flagfile" ]; then
    out=$(basename "$flagfile")
    out=${out%.flags}
    preset=$(basename "$(dirname "$flagfile")")
    if [ "$(basename "$(dirname "$(dirname "$flagfile")")")" = experiments ] && [ "$preset" != full ]; then
      out=${preset}_$out
    fi
  else
    if [ "$grad" = 1 ]; then
      out=conv_lr_scale
      if [ "$conv_l2" = 1 ]; then out=${out}_conv_l2; fi
      if [ "$factor" != piecewise ]; then out=${out}_$factor; fi
    elif [ "$conv_l2" = 1 ]; then
      out=baseline
    else
      out=noconv_l2
    fi
    # 0.98 -> bn098; numbers compared as numbers (0.9970 is the default too).
    bn_name=$(awk -v b="$bn" 'BEGIN {
      if (b ~ /^[0-9.eE+-]+$/) { if (b + 0 == 0.997) exit; s = sprintf("%g", b + 0) } else s = b
      gsub(/\./, "", s); print s }')
    if [ -n "$bn_name" ]; then out=${out}_bn$bn_name; fi
    if [ "$opt" != momentum ]; then out=${opt}_$out; fi
    if [ "$size" != 20 ]; then out=resnet${size}_$out; fi
  fi
  if [ "$source" = synthetic ]; then out=${out}_synthetic; fi
  if [ "$seed" != 0 ]; then out=${out}_seed$seed; fi
  # A plain folder name, whatever the flags held.
  out=$(printf '%s' "$out" | tr -c 'A-Za-z0-9._-' '_')
  case $out in ""|.*) out=run$out ;; esac
  printf '%s\n' "$out"
}

# Whether the arguments ask for absl's help.
is_help() {
  for arg in "$@"; do
    case $arg in
      --) return 1 ;;
      --help|--help=*|--helpshort*|--helpfull*|--helpxml*|-help|-helpshort|-helpfull) return 0 ;;
    esac
  done
  return 1
}

# Whether the arguments (or a flagfile among them) set --model_dir.
has_model_dir() {
  while [ $# -gt 0 ]; do
    case $1 in
      --) return 1 ;;
      --model_dir|--model_dir=*|-model_dir|-model_dir=*) return 0 ;;
      --flagfile=*|-flagfile=*)
        if grep -Eqs '^[[:space:]]*-{1,2}model_dir([=[:space:]]|$)' "${1#*=}"; then return 0; fi ;;
      --flagfile|-flagfile)
        if [ $# -gt 1 ] && grep -Eqs '^[[:space:]]*-{1,2}model_dir([=[:space:]]|$)' "$2"; then return 0; fi ;;
    esac
    shift
  done
  return 1
}

is_mounted() {
  [ -r /proc/self/mountinfo ] && awk -v d="$1" '$5 == d { found = 1 } END { exit !found }' /proc/self/mountinfo
}

case "${1:-}" in
  ""|-h|--help|-help|--helpshort|-helpshort)
    if [ $# -le 1 ]; then usage; fi
    exec python -m resnet_cifar.train "$@" ;;
  -*)
    if is_help "$@"; then exec python -m resnet_cifar.train "$@"; fi
    if ! ls /dev/nvidia[0-9]* /dev/dxg > /dev/null 2>&1; then
      echo "resnet-cifar: no GPU in this container (docker run --gpus all ...): training runs on the CPU" >&2
    fi
    # The trainer's last hint then names a command for the host, not a path in here.
    export RESNET_CIFAR_CONTAINER_RUNS="$runs"
    if has_model_dir "$@"; then
      exec python -m resnet_cifar.train "$@"
    fi
    model_dir="$runs/$(run_name "$@")"
    if is_mounted "$runs"; then
      echo "resnet-cifar: --model_dir=$model_dir (named after the flags; --model_dir=DIR chooses)" >&2
    else
      echo "resnet-cifar: --model_dir=$model_dir (named after the flags); $runs is not a mounted" \
        "folder, so the run is lost when the container is removed (at exit, with --rm):" \
        "-v \$PWD/runs:$runs keeps it" >&2
    fi
    # First, so that a --model_dir in a flagfile would still win.
    exec python -m resnet_cifar.train "--model_dir=$model_dir" "$@" ;;
  *) exec "$@" ;;
esac
