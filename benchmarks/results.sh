#!/usr/bin/env bash
# Reproduce the README "Results" rows on the real data, one `ltq` command per row.
#
#   bash ../shared/data/extract.sh data          # once: data/cifar10-jpeg, data/tiny-imagenet-200
#   bash benchmarks/results.sh fashion [SEEDS]   # Fashion-MNIST cnn / cnn_bn: FP, PTQ, QAT, APoT, TTQ
#   bash benchmarks/results.sh cifar             # ResNet-20 / CIFAR-10 (budgeted FP + fine-tunes)
#   bash benchmarks/results.sh tiny              # small DenseNet / Tiny ImageNet (reduced copy): FP, TTQ
#   bash benchmarks/results.sh row NAME DIR ltq ...   # a single row
#   bash benchmarks/results.sh queue cifar fashion "0 1 2" tiny > q   # the same rows as a queue file for
#   bash benchmarks/queue.sh q 2                         # ... two 1-thread workers (each row waits for its FP run)
#
# Every row appends {"row", "cmd", "wall_s", "rc", "summary"} to $OUT/results.jsonl (summary =
# the run's summary.json: top-1/top-5, deployed top-1, size, sparsity); `python
# benchmarks/results_table.py $OUT/results.jsonl` prints the Markdown tables of the README.
# Checkpoints are selected on the validation split (ModelCheckpoint on val/acc1); the test split
# is evaluated once, on that checkpoint.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results}
DATA=${DATA:-data}
FMNIST=${FMNIST:-../shared/data/fashion-mnist}
CIFAR=${CIFAR:-$DATA/cifar10-jpeg}
TINY=${TINY:-$DATA/tiny-imagenet-200}
# CPU budgets (epochs) for the slow rows; the originals' full recipes are in the configs.
# (README "Results": CIFAR FP 15 epochs, every fine-tune 1 epoch; Tiny ImageNet FP 2, TTQ 1.)
CIFAR_FP_EPOCHS=${CIFAR_FP_EPOCHS:-15}
CIFAR_FT_EPOCHS=${CIFAR_FT_EPOCHS:-1}
TINY_FP_EPOCHS=${TINY_FP_EPOCHS:-2}
TINY_TTQ_EPOCHS=${TINY_TTQ_EPOCHS:-1}
CIFAR_LIMIT=${CIFAR_LIMIT:-}   # e.g. 20000: train on a fixed random subset of the 45k training split
mkdir -p "$OUT/logs"
COMMON=(--trainer.enable_progress_bar false)

QUEUE=0       # 1: print "PREREQ NAME ROOT CMD" lines for benchmarks/queue.sh instead of running
PREREQ=-      # file a row waits for in queue mode (the summary.json of the FP run it starts from)

row() {  # row NAME ROOT_DIR ltq ARGS...
  local name=$1 root=$2; shift 2
  if [ "$QUEUE" = 1 ]; then echo "$PREREQ $name $root $*"; return; fi
  local start rc
  start=$(date +%s)
  "$@" --trainer.default_root_dir "$root" "${COMMON[@]}" > "$OUT/logs/${name//\//_}.log" 2>&1
  rc=$?
  python - "$name" "$root" "$rc" "$(( $(date +%s) - start ))" "$*" >> "$OUT/results.jsonl" <<'EOF'
import json, sys, pathlib
name, root, rc, wall, cmd = sys.argv[1:]
summary = pathlib.Path(root, "summary.json")
print(json.dumps({"row": name, "cmd": cmd, "wall_s": int(wall), "rc": int(rc),
                  "summary": json.loads(summary.read_text()) if summary.is_file() else None}))
EOF
  echo "$name rc=$rc $(( $(date +%s) - start ))s"
}

fashion() {
  local seed=$1
  for net in cnn cnn_bn; do
    local fp=$OUT/fp/${net}_fashionmnist_s$seed
    PREREQ=-
    row "fp/$net/s$seed" "$fp" ltq fit --config configs/fp/${net}_fashionmnist.yaml --data.root "$FMNIST" --seed_everything "$seed"
    PREREQ=$fp/summary.json
    for b in 4 6 8; do
      row "ptq/$net/w${b}a${b}/s$seed" "$OUT/ptq/${net}_w${b}a${b}_s$seed" ltq test --config configs/ptq/${net}_fashionmnist.yaml \
        --data.root "$FMNIST" --model.fp_checkpoint "$fp/checkpoints/best.ckpt" --model.w_bits $b --model.a_bits $b --seed_everything "$seed"
    done
    for b in 4 6 8; do
      row "qat/$net/w${b}a${b}/s$seed" "$OUT/qat/${net}_w${b}a${b}_s$seed" ltq fit --config configs/qat/${net}_fashionmnist.yaml \
        --data.root "$FMNIST" --model.fp_checkpoint "$fp/checkpoints/best.ckpt" --model.w_bits $b --model.a_bits $b --seed_everything "$seed"
    done
  done
  local fp=$OUT/fp/cnn_fashionmnist_s$seed
  PREREQ=$fp/summary.json
  row "apot/cnn/4bit/s$seed" "$OUT/apot/cnn_4bit_s$seed" ltq fit --config configs/apot/cnn_fashionmnist.yaml \
    --data.root "$FMNIST" --model.init_checkpoint "$fp/checkpoints/best.ckpt" --model.bits 4 --seed_everything "$seed"
  row "ttq/cnn/s$seed" "$OUT/ttq/cnn_s$seed" ltq fit --config configs/ttq/cnn_fashionmnist.yaml \
    --data.root "$FMNIST" --model.fp_checkpoint "$fp/checkpoints/best.ckpt" --seed_everything "$seed"
}

cifar() {
  local fp=$OUT/fp/resnet20_cifar10 ck lim=()
  ck=$fp/checkpoints/best.ckpt
  [ -n "$CIFAR_LIMIT" ] && lim=(--data.limit_train_samples "$CIFAR_LIMIT")
  PREREQ=-
  row "fp/resnet20" "$fp" ltq fit --config configs/fp/resnet20_cifar10.yaml --data.root "$CIFAR" "${lim[@]}" \
    --trainer.max_epochs "$CIFAR_FP_EPOCHS" --model.scheduler cosine
  PREREQ=$fp/summary.json
  for b in 8 4; do
    row "ptq/resnet20/w${b}a${b}" "$OUT/ptq/resnet20_w${b}a${b}" ltq test --config configs/ptq/resnet20_cifar10.yaml \
      --data.root "$CIFAR" --model.fp_checkpoint "$ck" --model.w_bits $b --model.a_bits $b
  done
  local ft=(--data.root "$CIFAR" --trainer.max_epochs "$CIFAR_FT_EPOCHS" "${lim[@]}")
  # the fine-tunes run CIFAR_FT_EPOCHS with the configs' lr / 10 for QAT and APoT (the configs carry the
  # originals' 15- and 300-epoch schedules; at their lr one epoch from the converged FP model lost 1.9 points
  # for 8-bit QAT and 8.2 for 4-bit APoT, and 2-bit APoT's alpha went negative)
  row "qat/resnet20/w8a8" "$OUT/qat/resnet20_w8a8" ltq fit --config configs/qat/resnet20_cifar10.yaml "${ft[@]}" --model.fp_checkpoint "$ck" \
    --model.lr 0.001
  for b in 4 3 2; do
    row "apot/resnet20/${b}bit" "$OUT/apot/resnet20_${b}bit" ltq fit --config configs/apot/resnet20_cifar10.yaml "${ft[@]}" \
      --model.init_checkpoint "$ck" --model.bits $b --model.scheduler cosine --model.lr 0.004 --model.weight_alpha_lr 0.002 \
      --model.act_alpha_lr 0.01
  done
  row "ttq/resnet20" "$OUT/ttq/resnet20" ltq fit --config configs/ttq/resnet20_cifar10.yaml "${ft[@]}" --model.fp_checkpoint "$ck"
  for meta in ste lstmfc; do
    row "metaquant/resnet20/bwn-$meta" "$OUT/metaquant/resnet20_bwn_$meta" ltq fit --config configs/metaquant/resnet20_cifar10.yaml "${ft[@]}" \
      --model.fp_checkpoint "$ck" --model.forward bwn --model.meta $meta --model.optimizer adam
  done
}

tiny() {
  local fp=$OUT/fp/densenet_small_tinyimagenet
  PREREQ=-
  row "fp/densenet_small" "$fp" ltq fit --config configs/fp/densenet_small_tinyimagenet.yaml --data.root "$TINY" \
    --trainer.max_epochs "$TINY_FP_EPOCHS" --model.scheduler cosine
  PREREQ=$fp/summary.json
  row "ttq/densenet_small" "$OUT/ttq/densenet_small_tinyimagenet" ltq fit --config configs/ttq/densenet_small_tinyimagenet.yaml \
    --data.root "$TINY" --trainer.max_epochs "$TINY_TTQ_EPOCHS" --model.fp_checkpoint "$fp/checkpoints/best.ckpt"
}

what=${1:-all}
seeds=${2:-0}
case $what in
  fashion) for s in $seeds; do fashion "$s"; done ;;
  cifar) cifar ;;
  tiny) tiny ;;
  all) for s in $seeds; do fashion "$s"; done; cifar; tiny ;;
  row) shift; row "$@" ;;  # one row: results.sh row NAME ROOT_DIR ltq ARGS...
  queue) QUEUE=1; shift
    while [ $# -gt 0 ]; do
      case $1 in
        fashion) for s in ${2:-0}; do fashion "$s"; done; shift ;;
        cifar) cifar ;;
        tiny) tiny ;;
        *) echo "usage: $0 queue [cifar] [fashion SEEDS] [tiny]" >&2; exit 2 ;;
      esac
      shift
    done ;;
  *) echo "usage: $0 fashion|cifar|tiny|all [seeds] | row NAME DIR ltq ... | queue [cifar] [fashion SEEDS] [tiny]"; exit 2 ;;
esac
