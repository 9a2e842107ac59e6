#!/usr/bin/env bash
# Run results rows from a queue file with several single-threaded workers, so that a long list
# of trainings keeps every core busy (on a 2-core CPU, two 1-thread runs side by side finish
# sooner than the same runs one after another with 2 threads each).
#
#   bash benchmarks/queue.sh QUEUE_FILE [WORKERS=2]
#   (e.g. `bash benchmarks/results.sh queue cifar fashion "0 1 2" tiny > q && bash benchmarks/queue.sh q`)
#
# Each line of QUEUE_FILE is  `PREREQ NAME ROOT ltq ARGS...`  (whitespace-separated, no quoting):
# the row is started only once the file PREREQ exists (`-` for none), e.g. the FP checkpoint a
# fine-tune starts from. Workers take the first startable line, in file order, so order the file
# by priority; lines can be appended while workers run. A row runs as
# `benchmarks/results.sh row NAME ROOT ltq ARGS...` (the result lands in $OUT/results.jsonl) with
# OMP_NUM_THREADS=1. A worker exits when the queue is empty, or when only rows whose PREREQ
# cannot appear any more are left (no row running).
set -u
cd "$(dirname "$0")/.."
queue=$(realpath "$1")
workers=${2:-2}
lock=$queue.lock
running=$queue.running
touch "$running"
export OMP_NUM_THREADS=1

take() {  # print the first startable line and remove it from the queue (under the lock)
  exec 9>"$lock"
  flock 9
  local line prereq found="" rest=()
  while IFS= read -r line; do
    [ -z "${line// }" ] && continue
    prereq=${line%% *}
    if [ -z "$found" ] && { [ "$prereq" = "-" ] || [ -e "$prereq" ]; }; then
      found=$line
    else
      rest+=("$line")
    fi
  done < "$queue"
  if [ -n "$found" ]; then
    printf '%s\n' "${rest[@]+"${rest[@]}"}" > "$queue"
    echo "$found" >> "$running"
  fi
  flock -u 9
  echo "$found"
}

worker() {
  local id=$1 line
  while :; do
    line=$(take)
    if [ -z "$line" ]; then
      if ! grep -q '[^[:space:]]' "$queue" 2>/dev/null; then
        echo "worker $id: queue empty"; return
      fi
      if ! grep -q '[^[:space:]]' "$running"; then
        echo "worker $id: only rows with missing prerequisites left"; return
      fi
      sleep 20; continue
    fi
    # shellcheck disable=SC2086
    set -- ${line#* }
    echo "worker $id: $(date +%T) start $1"
    bash benchmarks/results.sh row "$@"
    exec 9>"$lock"; flock 9
    grep -vxF -e "$line" "$running" > "$running.tmp"; mv "$running.tmp" "$running"
    flock -u 9
  done
}

for i in $(seq 1 "$workers"); do
  worker "$i" &
  sleep 1
done
wait
