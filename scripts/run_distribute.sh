#!/usr/bin/env bash
# Launch a distributed `ms-llm train` run: msrun (single or multi node), rank table, dry run, or CPU data parallel.
#
#   Ascend, one node, 8 NPUs:
#     bash scripts/run_distribute.sh --config configs/gpt/gpt3_13b.yaml --nproc 8
#   Ascend, 4 nodes x 8 NPUs (run on every node with its --node-rank):
#     bash scripts/run_distribute.sh --config C --nproc 8 --nnodes 4 --node-rank 0 --master-addr 10.0.0.1
#   Ascend with a rank table (one process per device, no msrun):
#     bash scripts/run_distribute.sh --config C --nproc 8 --rank-table /path/rank_table_8pcs.json
#   Dry run on a host with CANN but no NPU: compile rank 0's graph of a 64-device job, save its strategy file:
#     bash scripts/run_distribute.sh --config C --nproc 8 --nnodes 8 --dry-run
#   CPU, data parallel over 2 processes (MindSpore runs only data parallel on CPU):
#     bash scripts/run_distribute.sh --config configs/gpt/tiny.yaml --device CPU --nproc 2 -- train.steps=20
#
# Everything after `--` (or given with --overrides "a=1 b=2") is passed to `ms-llm train` as key.sub=value overrides.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: run_distribute.sh --config FILE [options] [-- key.sub=value ...]
  --config FILE        run config (YAML) for `ms-llm train`                         (required)
  --device D           Ascend | CPU                                                 (default Ascend)
  --nproc N            processes (devices) on this node                             (default 8 on Ascend, 2 on CPU)
  --nnodes N           nodes in the job                                             (default 1)
  --node-rank R        this node's index, 0..nnodes-1                               (default 0)
  --master-addr A      address of node 0's scheduler                                (default 127.0.0.1)
  --master-port P      port of the scheduler                                        (default 8118)
  --log-dir DIR        worker logs (and dry-run strategy files)                     (default ./msrun_log)
  --output-dir DIR     train.output_dir (checkpoints, metrics, strategy file)       (default from the config)
  --rank-table FILE    launch one process per device with a rank table instead of msrun (Ascend)
  --dry-run            compile without NPUs (MS_SIMULATION_LEVEL, needs CANN): one process simulating
                       --sim-rank of nproc*nnodes devices; saves the strategy file
  --sim-level L        MS_SIMULATION_LEVEL for --dry-run: 0 compile, 1 +memory, 2 +workspace, 3 +kernels (default 1)
  --sim-rank R         rank the dry run simulates                                   (default 0)
  --timeout S          cluster time-out in seconds (msrun --cluster_time_out)       (default 600)
  --python BIN         Python interpreter whose environment has ms_llm              (default: python on PATH)
  --overrides "..."    space-separated key.sub=value overrides (same as after --)
  --print-only         print the command(s) and exit without running
EOF
}

die() { echo "run_distribute.sh: $*" >&2; exit 2; }

CONFIG="" DEVICE="Ascend" NPROC="" NNODES=1 NODE_RANK=0 MASTER_ADDR="127.0.0.1" MASTER_PORT=8118
LOG_DIR="./msrun_log" OUTPUT_DIR="" RANK_TABLE="" DRY_RUN=0 SIM_LEVEL=1 SIM_RANK=0 TIMEOUT=600
PYTHON_BIN="${PYTHON:-python}" PRINT_ONLY=0
OVERRIDES=()

need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --device) need "$@"; DEVICE="$2"; shift 2 ;;
    --nproc) need "$@"; NPROC="$2"; shift 2 ;;
    --nnodes) need "$@"; NNODES="$2"; shift 2 ;;
    --node-rank) need "$@"; NODE_RANK="$2"; shift 2 ;;
    --master-addr) need "$@"; MASTER_ADDR="$2"; shift 2 ;;
    --master-port) need "$@"; MASTER_PORT="$2"; shift 2 ;;
    --log-dir) need "$@"; LOG_DIR="$2"; shift 2 ;;
    --output-dir) need "$@"; OUTPUT_DIR="$2"; shift 2 ;;
    --rank-table) need "$@"; RANK_TABLE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --sim-level) need "$@"; SIM_LEVEL="$2"; shift 2 ;;
    --sim-rank) need "$@"; SIM_RANK="$2"; shift 2 ;;
    --timeout) need "$@"; TIMEOUT="$2"; shift 2 ;;
    --python) need "$@"; PYTHON_BIN="$2"; shift 2 ;;
    --overrides) need "$@"; read -r -a more <<< "$2"; OVERRIDES+=("${more[@]}"); shift 2 ;;
    --print-only) PRINT_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
[[ -n "$CONFIG" ]] || { usage >&2; die "--config is required"; }
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
[[ "$DEVICE" == "Ascend" || "$DEVICE" == "CPU" ]] || die "--device must be Ascend or CPU, got '$DEVICE'"
[[ -n "$NPROC" ]] || { if [[ "$DEVICE" == "CPU" ]]; then NPROC=2; else NPROC=8; fi; }
for v in NPROC NNODES NODE_RANK MASTER_PORT SIM_LEVEL SIM_RANK TIMEOUT; do
  is_int "${!v}" || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a non-negative integer, got '${!v}'"
done
(( NPROC >= 1 )) || die "--nproc must be >= 1"
(( NNODES >= 1 )) || die "--nnodes must be >= 1"
(( NODE_RANK < NNODES )) || die "--node-rank $NODE_RANK must be < --nnodes $NNODES"
(( SIM_LEVEL <= 3 )) || die "--sim-level must be 0..3"
WORLD=$(( NPROC * NNODES ))
(( SIM_RANK < WORLD )) || die "--sim-rank $SIM_RANK must be < nproc*nnodes = $WORLD"
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  [[ "$o" == *=* ]] || die "override '$o' is not of the form key.sub=value"
done
if [[ "$DEVICE" == "CPU" ]]; then
  (( DRY_RUN == 0 )) || die "--dry-run needs the Ascend target with CANN (MindSpore refuses dry runs on CPU)"
  [[ -z "$RANK_TABLE" ]] || die "--rank-table is for Ascend (HCCL); CPU jobs start with msrun"
  (( NNODES == 1 )) || die "CPU runs are single-node here (--nnodes 1)"
fi
if [[ -n "$RANK_TABLE" ]]; then
  (( DRY_RUN == 0 )) || die "--rank-table and --dry-run are exclusive"
  [[ -f "$RANK_TABLE" ]] || die "rank table not found: $RANK_TABLE"
fi

# msrun starts every worker with the first `python` on PATH: put the chosen interpreter's bin first
if [[ "$PYTHON_BIN" == */* ]]; then
  [[ -x "$PYTHON_BIN" ]] || die "--python $PYTHON_BIN is not an executable"
  PATH="$(cd "$(dirname "$PYTHON_BIN")" && pwd):$PATH"
  export PATH
  PYTHON_BIN="python"
fi

TRAIN_ARGS=(-m ms_llm train "$CONFIG" --device "$DEVICE")
[[ -n "$OUTPUT_DIR" ]] && TRAIN_ARGS+=(--output-dir "$OUTPUT_DIR")
if [[ "$DEVICE" == "CPU" ]]; then
  # MindSpore runs only data parallel on CPU: one replica per process
  TRAIN_ARGS+=("parallel.mode=data_parallel" "parallel.data_parallel=$WORLD")
fi
if (( DRY_RUN )); then
  TRAIN_ARGS+=("train.steps=1" "parallel.strategy_ckpt_save_file=$LOG_DIR/strategy/strategy_rank$SIM_RANK.ckpt")
fi
TRAIN_ARGS+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")

quote() { local out=() a; for a in "$@"; do out+=("$(printf '%q' "$a")"); done; echo "${out[*]}"; }

if (( DRY_RUN )); then
  ENV_DESC="MS_SIMULATION_LEVEL=$SIM_LEVEL RANK_SIZE=$WORLD RANK_ID=$SIM_RANK"
  echo "dry run: rank $SIM_RANK of $WORLD simulated devices, MS_SIMULATION_LEVEL=$SIM_LEVEL"
  echo "command: $ENV_DESC $(quote "$PYTHON_BIN" "${TRAIN_ARGS[@]}")"
  echo "log: $LOG_DIR/dryrun_rank$SIM_RANK.log   strategy file: $LOG_DIR/strategy/strategy_rank$SIM_RANK.ckpt"
  (( PRINT_ONLY )) && exit 0
  mkdir -p "$LOG_DIR/strategy"
  MS_SIMULATION_LEVEL=$SIM_LEVEL RANK_SIZE=$WORLD RANK_ID=$SIM_RANK \
    "$PYTHON_BIN" "${TRAIN_ARGS[@]}" 2>&1 | tee "$LOG_DIR/dryrun_rank$SIM_RANK.log"
  exit "${PIPESTATUS[0]}"
fi

if [[ -n "$RANK_TABLE" ]]; then
  echo "rank table: $RANK_TABLE, node $NODE_RANK of $NNODES, $NPROC devices here, $WORLD ranks"
  for (( i = 0; i < NPROC; i++ )); do
    rank=$(( NODE_RANK * NPROC + i ))
    env_desc="RANK_TABLE_FILE=$RANK_TABLE DEVICE_ID=$i RANK_ID=$rank RANK_SIZE=$WORLD"
    echo "command: $env_desc $(quote "$PYTHON_BIN" "${TRAIN_ARGS[@]}") > $LOG_DIR/worker_$rank.log"
  done
  echo "logs: $LOG_DIR/worker_<rank>.log"
  (( PRINT_ONLY )) && exit 0
  mkdir -p "$LOG_DIR"
  pids=()
  for (( i = 0; i < NPROC; i++ )); do
    rank=$(( NODE_RANK * NPROC + i ))
    RANK_TABLE_FILE="$RANK_TABLE" MINDSPORE_HCCL_CONFIG_PATH="$RANK_TABLE" DEVICE_ID=$i RANK_ID=$rank \
      RANK_SIZE=$WORLD "$PYTHON_BIN" "${TRAIN_ARGS[@]}" > "$LOG_DIR/worker_$rank.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  (( status == 0 )) || echo "run_distribute.sh: a worker failed (exit $status); see $LOG_DIR/worker_*.log" >&2
  exit "$status"
fi

MSRUN=(msrun "--worker_num=$WORLD" "--local_worker_num=$NPROC" "--master_addr=$MASTER_ADDR"
       "--master_port=$MASTER_PORT" "--node_rank=$NODE_RANK" "--log_dir=$LOG_DIR" "--join=True"
       "--cluster_time_out=$TIMEOUT")
echo "msrun: $WORLD processes ($NPROC on node $NODE_RANK of $NNODES) on $DEVICE, scheduler $MASTER_ADDR:$MASTER_PORT"
echo "command: $(quote "${MSRUN[@]}" python "${TRAIN_ARGS[@]}")"
echo "logs: $LOG_DIR/worker_<rank>.log, $LOG_DIR/scheduler.log"
(( PRINT_ONLY )) && exit 0
command -v msrun > /dev/null || die "msrun not found on PATH (it comes with the mindspore package; pass --python)"
# msrun starts every worker as `python -m ms_llm train ...` with the first python on PATH
exec "${MSRUN[@]}" python "${TRAIN_ARGS[@]}"
