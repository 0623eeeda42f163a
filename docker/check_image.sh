#!/usr/bin/env bash
# `check && ok ... || bad ...` below: ok only echoes, so bad runs exactly when the check fails.
# shellcheck disable=SC2015
# Build the image for real and run the commands of docs/container.md in it, on a machine
# without a GPU (the image falls back to the CPU). Not run by CI: it needs root and podman
# (or docker), and with the stand-in base image to make it takes well over ten minutes.
#
#   docker/check_image.sh [--build-base] [--mirror=URL] [--workdir=DIR] [--keep]
#
#   --build-base  first make a stand-in for the base image named in the Dockerfile's FROM
#                 (tensorflow/tensorflow:2.21.0-gpu): a Debian bookworm rootfs
#                 (debootstrap, as root) with Python 3.11, as TensorFlow's images have,
#                 and `pip install tensorflow==2.21.0`, imported under that name. Use it
#                 where the real base image cannot be pulled.
#   --mirror=URL  the Debian mirror for debootstrap; default: the first bookworm source
#                 of this machine's apt configuration.
#   --workdir=DIR scratch folder (rootfs, mounted runs/ and tfds/); default: a new temp one.
#   --keep        keep the scratch folder.
#
# ENGINE=docker uses docker instead of podman. ENGINE_OPTS: options put before every
# engine command; for podman the default is `--runtime runc`, and RUN_OPTS (build and
# run) defaults to raised ulimits, which podman needs on some VMs. IMAGE names the image
# built (default resnet-cifar). The image is built with --pull=never, so the base image
# must already be there (pulled, or made by --build-base).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

build_base=0 mirror="" workdir="" keep=0
for arg in "$@"; do
  case "$arg" in
    --build-base) build_base=1 ;;
    --mirror=*) mirror=${arg#--mirror=} ;;
    --workdir=*) workdir=${arg#--workdir=} ;;
    --keep) keep=1 ;;
    -h|--help) awk 'NR > 3 && /^#/ { sub(/^# ?/, ""); print; next } NR > 3 { exit }' "$0"; exit 0 ;;
    *) echo "check_image.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

ENGINE=${ENGINE:-podman}
if [ "$ENGINE" = podman ]; then
  ENGINE_OPTS=${ENGINE_OPTS---runtime runc}
  RUN_OPTS=${RUN_OPTS---ulimit nofile=20000:20000 --ulimit nproc=32768:32768}
else
  ENGINE_OPTS=${ENGINE_OPTS-}
  RUN_OPTS=${RUN_OPTS-}
fi
IMAGE=${IMAGE:-resnet-cifar}
base=$(awk 'toupper($1) == "FROM" {print $2; exit}' Dockerfile)
# shellcheck disable=SC2086  # the option strings are meant to split into words
engine() { "$ENGINE" $ENGINE_OPTS "$@"; }
# shellcheck disable=SC2086
run() { engine run --rm $RUN_OPTS "$@"; }

if [ -z "$workdir" ]; then
  workdir=$(mktemp -d "${TMPDIR:-/tmp}/check_image.XXXXXX")
fi
mkdir -p "$workdir"
cleanup() {
  if [ "$keep" = 0 ]; then rm -rf "$workdir"; else echo "scratch folder kept: $workdir"; fi
}
trap cleanup EXIT

fails=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fails=$((fails + 1)); }
step() { echo; echo "== $*"; }

# ---------------------------------------------------------------------------------------
# The stand-in base image.
apt_bookworm_mirror() {
  # deb822 (.sources: URIs + Suites) and one-line (.list: deb [opts] URI SUITE ...) files.
  python3 - <<'EOF'
import glob, re
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*"))
found = []
for path in files:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for para in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", para, re.M))
            if "bookworm" in fields.get("Suites", "").split():
                found += fields.get("URIs", "").split()
    else:
        for line in text.splitlines():
            line = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(line) >= 3 and line[0] == "deb" and line[2] == "bookworm":
                found.append(line[1])
print(found[0] if found else "")
EOF
}

if [ "$build_base" = 1 ]; then
  step "stand-in base image $base"
  tf_version=${base##*:}; tf_version=${tf_version%%-*}
  [ -n "$mirror" ] || mirror=$(apt_bookworm_mirror)
  if [ -z "$mirror" ]; then
    echo "check_image.sh: no bookworm source in the apt configuration; give --mirror=URL" >&2
    exit 2
  fi
  command -v debootstrap > /dev/null || { echo "check_image.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
  rootfs="$workdir/rootfs"
  if [ -x "$rootfs/usr/bin/python3" ]; then
    echo "reusing the rootfs of an earlier --keep run in $workdir"
  else
    echo "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
      bookworm "$rootfs" "$mirror" > "$workdir/debootstrap.log" 2>&1 \
      || { tail -20 "$workdir/debootstrap.log"; keep=1; exit 1; }
  fi
  # As in TensorFlow's images: `python` is Python 3 and pip installs into it as root
  # (no PEP 668 marker); pip's cache does not stay behind.
  ln -sf python3 "$rootfs/usr/bin/python"
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  # This machine's CA bundle, so that pip (Debian's uses the system bundle) reaches the
  # package index through whatever TLS proxy this machine trusts, in the rootfs and in
  # the image build alike.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  echo "pip install tensorflow==$tf_version (in the rootfs)"
  chroot "$rootfs" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
    python3 -m pip install -q --no-cache-dir --isolated --disable-pip-version-check \
    "tensorflow==$tf_version"
  : > "$rootfs/etc/resolv.conf"
  tar -C "$rootfs" -c . | engine import - "$base" > /dev/null
  rm -rf "$rootfs"
  ok "base image $base imported"
fi

# ---------------------------------------------------------------------------------------
step "build $IMAGE"
# shellcheck disable=SC2086
engine build --pull=never $RUN_OPTS -t "$IMAGE" . > "$workdir/build.log" 2>&1 \
  || { tail -30 "$workdir/build.log"; echo "FAIL build ($workdir/build.log)"; keep=1; exit 1; }
ok "built"

step "what the image holds"
volumes=$(engine image inspect --format '{{.Config.Volumes}}' "$IMAGE")
case "$volumes" in
  "map[]"|"<no value>"|"") ok "no VOLUME (no anonymous volumes left behind)" ;;
  *) bad "the image declares volumes: $volumes" ;;
esac
# Packages only the tests need (requirements.txt, after its "# Tests" line).
test_only=$(sed -n '/^# Tests/,$p' requirements.txt | sed 's/#.*//; s/[=<>!~ ].*//' | grep . | tr '\n' ' ' || true)
# shellcheck disable=SC2016  # $p, $HOME: for the image's shell
leftover=$(run --entrypoint sh "$IMAGE" -c '
  for p in '"$test_only"'; do
    # Installed and required by nothing: there for the tests alone (Ray needs pyyaml).
    python -m pip show "$p" 2> /dev/null | grep -qx "Required-by: *" && echo "package $p"
  done
  ls -d /root/.cache/pip /opt/resnet_cifar/build /opt/resnet_cifar/*.egg-info 2>/dev/null
  echo "HOME=$HOME"' 2>&1)
echo "$leftover" | grep -v '^HOME=' | grep -q . \
  && bad "test-only packages or build leftovers in the image: $(echo "$leftover" | grep -v '^HOME=' | tr '\n' ' ')" \
  || ok "no test-only packages (of: ${test_only% }), no pip cache, build/ or *.egg-info"
echo "$leftover" | grep '^HOME='

step "docker run IMAGE (no arguments): help, exit 0"
set +e; out=$(run "$IMAGE" 2>&1); rc=$?; set -e
echo "$out" | head -5; echo "   ... ($(echo "$out" | wc -l) lines), exit $rc"
[ "$rc" = 0 ] && echo "$out" | grep -q -- "--model_dir" && ok "help, exit 0" || bad "no-argument run: exit $rc"

step "one short run as the calling user, no --model_dir (the default folder)"
# As root, stand in for a user: the docs' --user $(id -u):$(id -g) is a user who owns runs/.
user="$(id -u):$(id -g)"
[ "$(id -u)" != 0 ] || user=4321:4321
mkdir -p "$workdir/runs"
[ "$(id -u)" != 0 ] || chown "$user" "$workdir/runs"
set +e
out=$(run --user "$user" -v "$workdir/runs:/runs" "$IMAGE" --flag_noconv_l2 \
  --data_source=synthetic --train_epochs=1 --steps_per_epoch=2 --eval_steps=1 --verbose=2 2>&1)
rc=$?
set -e
echo "$out" | tail -8 | sed 's/^/   | /'
echo "   exit $rc; runs/: $(cd "$workdir/runs" && ls)"
# A synthetic run is named apart from the real one (docs/container.md, "Where a run goes").
if [ "$rc" = 0 ] && [ -f "$workdir/runs/noconv_l2_synthetic/run_config.json" ]; then
  ok "--flag_noconv_l2 --data_source=synthetic trained into /runs/noconv_l2_synthetic"
else
  bad "--flag_noconv_l2: exit $rc, no /runs/noconv_l2_synthetic/run_config.json"
fi
owners=$(find "$workdir/runs" -mindepth 1 ! -user "${user%%:*}" | head -3)
[ -z "$owners" ] && [ -d "$workdir/runs/noconv_l2_synthetic" ] && ok "every output owned by $user" \
  || bad "outputs not owned by $user: $owners"
noisy=$(echo "$out" | grep -E "oneDNN|cuInit|cudart|cuda drivers|TF-TRT|absl::InitializeLog|computation placer" || true)
[ -z "$noisy" ] && ok "no TensorFlow C++ start-up lines" || bad "C++ start-up lines: $noisy"

step "python -c 'import tensorflow': a quiet console in any process"
set +e; out=$(run "$IMAGE" python -c "import tensorflow as tf; print(tf.__version__)" 2>&1); rc=$?; set -e
[ "$rc" = 0 ] && [ "$(echo "$out" | grep -c .)" = 1 ] && ok "prints only its version: $out" \
  || bad "import tensorflow: exit $rc, printed: $out"
set +e
out=$(run -e TF_CPP_MIN_LOG_LEVEL=0 "$IMAGE" python -c "import tensorflow" 2>&1)
set -e
# Any C++ log line (I0000 00:00:..., E1208 ..., absl's pre-init warning): which ones a CPU
# prints differs (the oneDNN notice only where oneDNN is on by default; cuInit only without
# a GPU), their format does not.
echo "$out" | grep -Eq "^([IWEF][0-9]{4} [0-9:. ]|WARNING: All log messages before absl)" \
  && ok "-e TF_CPP_MIN_LOG_LEVEL=0 brings the C++ lines back" || bad "TF_CPP_MIN_LOG_LEVEL=0 shows no C++ lines"

step "an explicit --model_dir is kept"
set +e
out=$(run --user "$user" -v "$workdir/runs:/runs" "$IMAGE" --model_dir=/runs/mine --noconv_l2 \
  --data_source=synthetic --train_epochs=1 --steps_per_epoch=2 --eval_steps=1 --verbose=0 2>&1)
rc=$?
set -e
[ "$rc" = 0 ] && [ -f "$workdir/runs/mine/run_config.json" ] && ok "--model_dir=/runs/mine" \
  || { echo "$out" | tail -5; bad "--model_dir=/runs/mine: exit $rc"; }

step "python -m experiments.run_all --help"
set +e; out=$(run "$IMAGE" python -m experiments.run_all --help 2>&1); rc=$?; set -e
[ "$rc" = 0 ] && echo "$out" | grep -q -- "--results_dir" && ok "run_all --help, exit 0" \
  || { echo "$out" | tail -5; bad "run_all --help: exit $rc"; }

step "the docs' TFDS download, offline: fails fast, in one line"
mkdir -p "$workdir/tfds"
[ "$(id -u)" != 0 ] || chown "$user" "$workdir/tfds"
# The command of docs/container.md, as written there, with the network taken away.
# shellcheck disable=SC2016  # the docs' text, $PWD and $(id -u) included
tfds_cmd=$(sed -n 's/^docker run --rm -v \$PWD\/tfds:\/data\/tfds --user \$(id -u):\$(id -g) resnet-cifar //p' docs/container.md | head -1)
if [ -z "$tfds_cmd" ]; then
  bad "docs/container.md shows no TFDS download command"
else
  echo "   $tfds_cmd"
  start=$(date +%s)
  set +e
  out=$(eval "run --network none --user $user -v $workdir/tfds:/data/tfds $IMAGE $tfds_cmd" 2>&1)
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  printf '%s\n' "$out" | while IFS= read -r line; do echo "   | $line"; done
  lines=$(echo "$out" | grep -c . || true)
  if [ "$rc" != 0 ] && [ "$took" -le 60 ] && [ "$lines" = 1 ]; then
    ok "offline: exit $rc after ${took}s, one line"
  else
    bad "offline: exit $rc after ${took}s, $lines lines"
  fi
fi

echo
if [ "$fails" = 0 ]; then echo "check_image: all ok"; else echo "check_image: $fails failed"; exit 1; fi
