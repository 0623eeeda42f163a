#!/usr/bin/env bash
# Copy a campaign's small outputs into this folder, with the machine's paths replaced:
#   bash results/post/sync.sh CAMPAIGN_RESULTS DATA_DIR SOURCE_CHECKOUT
# CAMPAIGN_RESULTS is the runner's --results_dir, DATA_DIR the --data_dir given to the runs,
# SOURCE_CHECKOUT the checkout the runner ran from. Event files, run_config.json, done.json,
# train.log, conv_channel_sqsum.npz and a finished run's final weights (final.weights.h5) are
# copied. Of the checkpoints (2 MB each, a new one every epoch) only an unfinished run's newest
# (the one its index file names: written and read back whole) is copied, so the run resumes from
# it on another machine (the restore steps are in README.md); a finished run keeps none here.
set -euo pipefail
src=${1:?CAMPAIGN_RESULTS}; data=${2:?DATA_DIR}; code=${3:?SOURCE_CHECKOUT}
dst=$(cd "$(dirname "$0")" && pwd)
training=$(cd "$dst/.." && pwd)/training
src=$(cd "$src" && pwd)
for run_dir in "$src"/*/seed_*; do
  rel=${run_dir#"$src"/}
  if [ -f "$run_dir/done.json" ] && [ ! -f "$run_dir/final.weights.h5" ]; then   # runs trained before it was written
    (cd "$dst/../.." && python -c "import sys; from analysis import precise_bn; print(precise_bn.export_final_weights(sys.argv[1]))" "$run_dir")
  fi
  out="$dst/$rel"
  if [ ! -f "$run_dir/done.json" ]; then
    out="$training/$rel"
  else
    rm -rf "${training:?}/$rel"
  fi
  mkdir -p "$out"
  rsync -a --delete --exclude .lock --exclude 'checkpoints/' --exclude '*.tmp*' "$run_dir/" "$out/"
  rm -rf "$out/checkpoints"
  index="$run_dir/checkpoints/checkpoint"
  if [ ! -f "$run_dir/done.json" ] && [ -f "$index" ]; then
    newest=$(sed -n 's/^model_checkpoint_path: "\(ckpt-[0-9]*\)"$/\1/p' "$index")
    mkdir -p "$out/checkpoints"
    cp "$run_dir/checkpoints/$newest".index "$run_dir/checkpoints/$newest".data-* "$out/checkpoints/"
    printf 'model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' "$newest" "$newest" > "$out/checkpoints/checkpoint"
  fi
  for f in "$out/run_config.json" "$out/train.log" "$out/done.json"; do
    [ -f "$f" ] && sed -i -e "s#$src/#results/post/#g" -e "s#$data#DATA_DIR#g" -e "s#$code/#./#g" "$f"
  done
done
echo "synced $(ls -d "$dst"/*/seed_* | wc -l) finished run folders into $dst" \
  "and $(ls -d "$training"/*/seed_* 2>/dev/null | wc -l) unfinished ones into $training"
