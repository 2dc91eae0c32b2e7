#!/usr/bin/env bash
# Recipe: a vocoder on builtin:speech on a CPU, judged on sentences and voices it never heard, against Griffin-Lim.
# speech caches (13 training voices: 10 espeak-ng, 3 flite; 3 voices kept out: en-us-nyc, en-gb-scotland+f3, rms)
# -> vocoder -> evaluate_vocoder.py on new sentences of the training voices, on the held-out voices and on
# inference/examples, each beside Griffin-Lim (64 iterations) on the same mels. Nothing is downloaded.
#
#   bench/vocoder_recipe.sh                  # the tiny vocoder, 15000 steps (25 minutes on one core of a 2-core
#                                            # Xeon): runs/vocoder_recipe_tiny
#   SIZE=small bench/vocoder_recipe.sh       # the small (Vocos-sized) vocoder, 10000 steps (about 75 minutes on one
#                                            # idle core): runs/vocoder_recipe_small
#   DRY_RUN=1 bench/vocoder_recipe.sh        # a few steps, to check the plumbing (a few minutes)
#
# Every stage prints its wall time; sizes are environment variables (STEPS=..., TRAIN_ITEMS=...); SEED=N trains
# another initialisation and data order (default 42) into runs/vocoder_recipe_SIZE_seedN (the caches are shared).
# One torch thread (OMP_NUM_THREADS=1) by default, as the other recipes; set it to your free cores. The caches are built
# once (OVERWRITE_CACHES=1 rebuilds them); re-running replaces the run. Figures: bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SIZE=${SIZE:-tiny}
TRAIN_VOICES=en-us,en-gb,en-gb-scotland,en-gb-x-rp,en-029,en-us+f3,en+f2,en-gb-x-rp+f4,en-us+m3,en-029+f1,kal16,awb,slt
HELD_OUT_VOICES=en-us-nyc,en-gb-scotland+f3,rms
case "$SIZE" in
    tiny) CONFIG=tiny_freq_domain_vocoder STEPS=${STEPS:-15000} BATCH=${BATCH:-8} LR=${LR:-2e-3} ;;
    # small: 0.45 s a step on one idle core of a 2-core Xeon (0.27 s on two): 10000 steps in about 75 minutes
    small) CONFIG=small_freq_domain_vocoder STEPS=${STEPS:-10000} BATCH=${BATCH:-8} LR=${LR:-1e-3} ;;
    *) echo "SIZE must be tiny or small, got $SIZE" >&2; exit 2 ;;
esac
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NAME=vocoder_recipe_dry TRAIN_ITEMS=${TRAIN_ITEMS:-64} VAL_ITEMS=8 HELD_OUT_ITEMS=8 STEPS=20
else
    NAME=vocoder_recipe TRAIN_ITEMS=${TRAIN_ITEMS:-2000} VAL_ITEMS=${VAL_ITEMS:-40} HELD_OUT_ITEMS=${HELD_OUT_ITEMS:-30}
fi
DATA=cached_datasets/${NAME}
SEED=${SEED:-42}  # pretrain_vocoder.py's default
RUN=${NAME}_${SIZE}$([[ $SEED == 42 ]] || echo "_seed$SEED")

source bench/recipe_stages.sh  # stage NAME COMMAND...: run it and print its wall time

cache() {  # cache DIR SPLIT VOICES ITEMS: a builtin:speech vocoder cache, unless one is there already
    if [[ -f "$1/meta.json" && "${OVERWRITE_CACHES:-0}" != 1 ]]; then
        echo "$1: kept (OVERWRITE_CACHES=1 rebuilds it)"
        return
    fi
    $PYTHON preprocess_vocoder_dataset.py --dataset_name builtin:speech --voices "$3" --split "$2" --num_items "$4" \
        --output_dir "$1" --overwrite
}

stage "speech caches (${TRAIN_ITEMS} train utterances; ${VAL_ITEMS} new sentences, ${HELD_OUT_ITEMS} held-out voices)" \
    bash -c "$(declare -f cache); PYTHON=$PYTHON OVERWRITE_CACHES=${OVERWRITE_CACHES:-0}
        cache ${DATA}_train train $TRAIN_VOICES $TRAIN_ITEMS &&
        cache ${DATA}_val validation $TRAIN_VOICES $VAL_ITEMS &&
        cache ${DATA}_held_out validation $HELD_OUT_VOICES $HELD_OUT_ITEMS"

# the magnitude head starts at the mel's least-squares magnitude (magnitude_prior in the config): see RESULTS
stage "vocoder ${CONFIG} (${STEPS} steps, batch ${BATCH}, lr ${LR})" \
    $PYTHON pretrain_vocoder.py --run_name "$RUN" --vocoder_type "$CONFIG" --train_data_dir "${DATA}_train" \
        --val_data_dir "${DATA}_val" --max_steps "$STEPS" --batch_size "$BATCH" --learning_rate "$LR" \
        --eval_steps "$STEPS" --eval_batches 8 --save_steps "$STEPS" --save_total_limit 1 --no_progress_bar \
        --seed "$SEED" --overwrite_run

for set in val:"${DATA}_val" held_out:"${DATA}_held_out" examples:inference/examples; do
    label=${set%%:*} source=${set#*:}
    flag=--data_dir
    [[ $label == examples ]] && flag=--input_dir
    stage "evaluation on ${label} against Griffin-Lim" \
        $PYTHON evaluate_vocoder.py --run_dir "runs/$RUN" "$flag" "$source" --baseline griffin_lim \
            --output_json "runs/$RUN/eval_${label}.json"
done

echo
echo "recipe done in $((SECONDS - started)) s: runs/$RUN (eval_val.json, eval_held_out.json, eval_examples.json)"
