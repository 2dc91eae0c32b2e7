#!/usr/bin/env bash
# Recipe: text-to-speech on builtin:phrases on a CPU, end to end with no download, judged by independent judges:
# vocoder cache (builtin:speech, flite voices) -> vocoder -> utterance caches (builtin:phrases, builtin:words,
# resemblyzer) -> audio VAE and DiT -> the VAE through the vocoder (bench/audio_vae_quality.py: mel L1, PESQ/STOI
# against the vocoder on the real mel) -> speech for held-out prompts judged by pocketsphinx and a speaker judge
# against the real recordings (ceiling) and an empty prompt (floor) (bench/speech_judges.py).
#
#   bench/audio_recipe.sh                          # DiT over the VAE's latents, trained after it
#   REPRESENTATION=mel bench/audio_recipe.sh       # DiT over log-mel frames, trained beside the VAE (two processes;
#                                                  # at these sizes it did not learn: bench/RESULTS.md)
#   DRY_RUN=1 bench/audio_recipe.sh                # a few steps per stage, to check the plumbing (a few minutes)
#   VOCODER_CHECKPOINT=runs/vocoder_run/checkpoint-300 bench/audio_recipe.sh   # reuse a trained vocoder
#
# Every stage prints its wall time. The stage sizes are environment variables (VAE_STEPS=1000 ...). A vocoder of
# its own is trained on builtin:speech's flite voices, builtin:phrases' speakers (other sentences), unless
# VOCODER_CHECKPOINT names one. With REPRESENTATION=mel the DiT does not need the VAE, so the two train at once,
# one thread each. Re-running replaces the runs and caches of the same names. Figures:
# bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NAME=phrases_dry TRAIN_ITEMS=${TRAIN_ITEMS:-32} VAL_ITEMS=${VAL_ITEMS:-8} VOCODER_ITEMS=${VOCODER_ITEMS:-16}
    VOCODER_STEPS=${VOCODER_STEPS:-4} VAE_STEPS=${VAE_STEPS:-4} DIT_STEPS=${DIT_STEPS:-4} SAMPLE_STEPS=${SAMPLE_STEPS:-2}
    JUDGE_ITEMS=${JUDGE_ITEMS:-4} CENTROID_ITEMS=${CENTROID_ITEMS:-16}
else
    NAME=phrases TRAIN_ITEMS=${TRAIN_ITEMS:-2000} VAL_ITEMS=${VAL_ITEMS:-200} VOCODER_ITEMS=${VOCODER_ITEMS:-1000}
    VOCODER_STEPS=${VOCODER_STEPS:-8000} VAE_STEPS=${VAE_STEPS:-1000} DIT_STEPS=${DIT_STEPS:-3000}
    SAMPLE_STEPS=${SAMPLE_STEPS:-25} JUDGE_ITEMS=${JUDGE_ITEMS:-64} CENTROID_ITEMS=${CENTROID_ITEMS:-200}
fi
DATA=cached_datasets/${NAME}
REPRESENTATION=${REPRESENTATION:-latent}
case "$REPRESENTATION" in mel | latent) ;; *) echo "REPRESENTATION must be mel or latent, got $REPRESENTATION" >&2; exit 2 ;; esac
OFFLINE=(--text_encoder builtin:words --speaker_encoder resemblyzer --overwrite)
VAE_RUN=${NAME}_vae DIT_RUN=${NAME}_dit VOCODER_RUN=${NAME}_vocoder
VOCODER_CHECKPOINT=${VOCODER_CHECKPOINT:-runs/${VOCODER_RUN}/checkpoint-${VOCODER_STEPS}}

source bench/recipe_stages.sh  # stage NAME COMMAND...: run it and print its wall time

if [[ ! -d "$VOCODER_CHECKPOINT" ]]; then
    stage "vocoder caches (builtin:speech, ${VOCODER_ITEMS} utterances)" bash -c "
        $PYTHON preprocess_vocoder_dataset.py --dataset_name builtin:speech --voices flite --split train \
            --num_items $VOCODER_ITEMS --output_dir ${DATA}_vocoder_train --overwrite &&
        $PYTHON preprocess_vocoder_dataset.py --dataset_name builtin:speech --voices flite --split validation \
            --num_items 8 --output_dir ${DATA}_vocoder_val --overwrite"
    stage "vocoder (${VOCODER_STEPS} steps)" \
        $PYTHON pretrain_vocoder.py --run_name "$VOCODER_RUN" --vocoder_type tiny_freq_domain_vocoder --learning_rate 2e-3 \
            --train_data_dir "${DATA}_vocoder_train" --val_data_dir "${DATA}_vocoder_val" --max_steps "$VOCODER_STEPS" \
            --eval_steps "$VOCODER_STEPS" --eval_batches 2 --save_steps "$VOCODER_STEPS" --save_total_limit 1 \
            --no_progress_bar --overwrite_run
fi

stage "utterance caches (builtin:phrases: ${TRAIN_ITEMS} train, ${VAL_ITEMS} validation)" bash -c "
    $PYTHON preprocess_audio_diffusion_dataset.py --dataset_name builtin:phrases --split train \
        --num_items $TRAIN_ITEMS --output_dir ${DATA}_train ${OFFLINE[*]} &&
    $PYTHON preprocess_audio_diffusion_dataset.py --dataset_name builtin:phrases --split validation \
        --num_items $VAL_ITEMS --output_dir ${DATA}_val ${OFFLINE[*]}"

train_vae() {
    stage "audio VAE (${VAE_STEPS} steps)" \
        $PYTHON pretrain_audio_vae.py --run_name "$VAE_RUN" --config tiny --set "block_out_channels=[32, 64, 64, 64]" \
            --train_cache_dir "${DATA}_train" --val_cache_dir "${DATA}_val" --vocoder_checkpoint "$VOCODER_CHECKPOINT" \
            --max_steps "$VAE_STEPS" --batch_size 16 --learning_rate 5e-4 --segment_frames 96 \
            --eval_steps "$VAE_STEPS" --eval_batches 4 --save_steps "$VAE_STEPS" --save_total_limit 1 \
            --no_progress_bar --overwrite_run
}

train_dit() {  # mel: 4 frames a token; latent: one latent frame (8 mel frames) a token
    local over=(--set patch_size=4) what="log-mel frames"
    [[ $REPRESENTATION == latent ]] && over=(--set patch_size=1 --vae_checkpoint "runs/${VAE_RUN}/checkpoint-${VAE_STEPS}") \
        what="the VAE's latents"
    stage "DiT over ${what} (${DIT_STEPS} steps)" \
        $PYTHON pretrain_audio_diffusion.py --run_name "$DIT_RUN" --diffusion_type tiny_dit --set hidden_size=192 \
            --set depth=6 "${over[@]}" --ema_decay 0.999 --train_data_dir "${DATA}_train" --val_data_dir "${DATA}_val" \
            --vocoder_checkpoint "$VOCODER_CHECKPOINT" --max_steps "$DIT_STEPS" --batch_size 32 --learning_rate 5e-4 \
            --eval_steps "$DIT_STEPS" --eval_batches 4 --save_steps "$DIT_STEPS" --save_total_limit 1 \
            --sample_steps "$SAMPLE_STEPS" --no_progress_bar --overwrite_run
}

if [[ $REPRESENTATION == latent ]]; then
    train_vae
    train_dit
else  # independent: side by side, one process each
    side_by_side "audio VAE" train_vae "DiT" train_dit
fi

stage "the VAE through the vocoder (${JUDGE_ITEMS} validation utterances)" \
    $PYTHON bench/audio_vae_quality.py --vae_checkpoint "runs/${VAE_RUN}/checkpoint-${VAE_STEPS}" \
        --vocoder_checkpoint "$VOCODER_CHECKPOINT" --cache_dir "${DATA}_val" --max_items "$JUDGE_ITEMS"

stage "judges: ${JUDGE_ITEMS} held-out prompts, real vs generated vs empty prompt" \
    $PYTHON bench/speech_judges.py --run_dir "runs/$DIT_RUN" --vocoder_checkpoint "$VOCODER_CHECKPOINT" \
        --num_items "$JUDGE_ITEMS" --centroid_items "$CENTROID_ITEMS" --steps "$SAMPLE_STEPS"

echo
echo "recipe done in $((SECONDS - started)) s: runs/$VAE_RUN, runs/$DIT_RUN, runs/$DIT_RUN/speech_judges/"
