#!/usr/bin/env bash
# Recipe: the world model with text, images and speech in one sequence on a CPU, end to end with no download:
# utterance caches (builtin:phrases, builtin:words, resemblyzer) -> audio VAE -> image caches (builtin:shapes 32x32)
# -> image VAE -> interleaved caches (clips padded to AUDIO_FRAMES mel frames, as audio-VAE latents or log-mel
# frames; a BPE trained on captions and transcripts; both orders per image and clip) -> world model
# (multimodal/tiny, or multimodal/tiny_recurrent with BACKBONE=recurrent) -> recognition and text-to-speech
# (bench/wm_speech_eval.py) -> the speech judges (bench/speech_judges.py --listing: pocketsphinx WER and a
# resemblyzer speaker judge) -> captioning and text-to-image (bench/wm_shapes_eval.py).
#
#   bench/wm_audio_recipe.sh                          # runs/wm_audio*, cached_datasets/wm_audio_*
#   BACKBONE=recurrent WM_RUN=wm_audio_recurrent bench/wm_audio_recipe.sh      # the recurrent core
#   AUDIO_REPRESENTATION=mel bench/wm_audio_recipe.sh                         # log-mel frames, no audio VAE
#   WM_CONFIG=multimodal/tiny_deep WM_RUN=wm_audio_deep bench/wm_audio_recipe.sh  # plain stack, the recurrent core's compute
#   WM_CONFIG=multimodal/tiny_wide WM_STEPS=8000 WM_RUN=wm_audio_wide bench/wm_audio_recipe.sh  # wider, tiny's compute
#   AUDIO_VAE_CHECKPOINT=runs/wm_audio_audio_vae/checkpoint-1400 VOCODER_CHECKPOINT=runs/phrases_vocoder/checkpoint-8000 \
#       IMAGE_VAE_CHECKPOINT=runs/shapes_wm_vae/checkpoint-1800 bench/wm_audio_recipe.sh   # reuse trained parts
#   DRY_RUN=1 bench/wm_audio_recipe.sh                # a few steps per stage, to check the plumbing
#
# Speech is vocoded by VOCODER_CHECKPOINT (e.g. bench/audio_recipe.sh's vocoder) or, without one, Griffin-Lim.
# The audio VAE needs the same mel features as the vocoder (both use the defaults here). Every stage prints its
# wall time; the stage sizes are environment variables. OMP_NUM_THREADS defaults to 1. The audio and image VAEs
# train side by side (one process each) when both are needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NAME=wm_audio_dry TRAIN_ITEMS=${TRAIN_ITEMS:-32} VAL_ITEMS=${VAL_ITEMS:-8} TRAIN_IMAGES=${TRAIN_IMAGES:-64}
    VAL_IMAGES=${VAL_IMAGES:-16} AUDIO_VAE_STEPS=${AUDIO_VAE_STEPS:-4} IMAGE_VAE_STEPS=${IMAGE_VAE_STEPS:-4}
    AUDIO_VAE_CLIP_STEPS=${AUDIO_VAE_CLIP_STEPS:-2}
    WM_STEPS=${WM_STEPS:-8} CLIPS=${CLIPS:-4} PROMPTS=${PROMPTS:-2} CAPTIONS=${CAPTIONS:-4} SPECS_PER_COLOR=1
    SAMPLE_STEPS=${SAMPLE_STEPS:-2} WM_BATCH=${WM_BATCH:-8} CENTROID_ITEMS=${CENTROID_ITEMS:-16}
else
    NAME=wm_audio TRAIN_ITEMS=${TRAIN_ITEMS:-8000} VAL_ITEMS=${VAL_ITEMS:-200} TRAIN_IMAGES=${TRAIN_IMAGES:-4000}
    VAL_IMAGES=${VAL_IMAGES:-500} AUDIO_VAE_STEPS=${AUDIO_VAE_STEPS:-1000} IMAGE_VAE_STEPS=${IMAGE_VAE_STEPS:-1800}
    AUDIO_VAE_CLIP_STEPS=${AUDIO_VAE_CLIP_STEPS:-400}
    WM_STEPS=${WM_STEPS:-20000} CLIPS=${CLIPS:-200} PROMPTS=${PROMPTS:-96} CAPTIONS=${CAPTIONS:-200}
    SPECS_PER_COLOR=${SPECS_PER_COLOR:-4} SAMPLE_STEPS=${SAMPLE_STEPS:-25} WM_BATCH=${WM_BATCH:-32}
    CENTROID_ITEMS=${CENTROID_ITEMS:-200}
fi
DATA=cached_datasets/${NAME}
WM_RUN=${WM_RUN:-${NAME}}
BACKBONE=${BACKBONE:-causal}
AUDIO_REPRESENTATION=${AUDIO_REPRESENTATION:-latent}
AUDIO_FRAMES=${AUDIO_FRAMES:-192}  # mel frames per clip (3.1 s at 16 kHz, hop 256); longer utterances are skipped
DEFAULT_CONFIG=multimodal/tiny
[[ "$BACKBONE" == recurrent ]] && DEFAULT_CONFIG=multimodal/tiny_recurrent
CONFIG=${WM_CONFIG:-$DEFAULT_CONFIG}  # a name or a YAML path (e.g. a plain stack matched to the recurrent core's compute)
OFFLINE=(--text_encoder builtin:words --speaker_encoder resemblyzer --overwrite)
VOCODER_FLAGS=()
[[ -n "${VOCODER_CHECKPOINT:-}" ]] && VOCODER_FLAGS=(--vocoder_checkpoint "$VOCODER_CHECKPOINT")

source bench/recipe_stages.sh  # stage NAME COMMAND...: run it and print its wall time

stage "utterance caches (builtin:phrases: ${TRAIN_ITEMS} train, ${VAL_ITEMS} validation)" bash -c "
    $PYTHON preprocess_audio_diffusion_dataset.py --dataset_name builtin:phrases --split train \
        --num_items $TRAIN_ITEMS --output_dir ${DATA}_utterances_train ${OFFLINE[*]} &&
    $PYTHON preprocess_audio_diffusion_dataset.py --dataset_name builtin:phrases --split validation \
        --num_items $VAL_ITEMS --output_dir ${DATA}_utterances_val ${OFFLINE[*]}"

AUDIO_FLAGS=(--audio_representation "$AUDIO_REPRESENTATION" --audio_frames "$AUDIO_FRAMES")
TRAIN_AUDIO_VAE=0 TRAIN_IMAGE_VAE=0
if [[ "$AUDIO_REPRESENTATION" == latent ]]; then
    if [[ -z "${AUDIO_VAE_CHECKPOINT:-}" ]]; then
        TRAIN_AUDIO_VAE=1
        AUDIO_VAE_CHECKPOINT=runs/${NAME}_audio_vae/checkpoint-$((AUDIO_VAE_STEPS + AUDIO_VAE_CLIP_STEPS))
    fi
    AUDIO_FLAGS+=(--audio_vae_checkpoint "$AUDIO_VAE_CHECKPOINT")
fi
if [[ -z "${IMAGE_VAE_CHECKPOINT:-}" ]]; then
    TRAIN_IMAGE_VAE=1
    IMAGE_VAE_CHECKPOINT=runs/${NAME}_image_vae/checkpoint-${IMAGE_VAE_STEPS}
fi

# first on 96-frame crops of speech, then on whole clips padded with silence to AUDIO_FRAMES, as the world model's
# spans hold them: the VAE attends over the whole input, and one trained only on short crops of speech reconstructs
# a long padded clip badly (mel L1 0.48 against 0.35 unpadded; 0.31 after the second stage)
train_audio_vae() {
    local flags=(--config tiny --set "block_out_channels=[32, 64, 64, 64]"
                 --train_cache_dir "${DATA}_utterances_train" --val_cache_dir "${DATA}_utterances_val"
                 "${VOCODER_FLAGS[@]}" --batch_size 16 --learning_rate 5e-4 --eval_batches 4 --save_total_limit 1
                 --no_progress_bar --overwrite_run)
    local total=$((AUDIO_VAE_STEPS + AUDIO_VAE_CLIP_STEPS))
    stage "audio VAE (${AUDIO_VAE_STEPS} steps on 96-frame crops)" \
        $PYTHON pretrain_audio_vae.py --run_name "${NAME}_audio_vae_crops" "${flags[@]}" --segment_frames 96 \
            --max_steps "$AUDIO_VAE_STEPS" --eval_steps "$AUDIO_VAE_STEPS" --save_steps "$AUDIO_VAE_STEPS"
    stage "audio VAE (${AUDIO_VAE_CLIP_STEPS} more steps on clips padded to ${AUDIO_FRAMES} frames)" \
        $PYTHON pretrain_audio_vae.py --run_name "${NAME}_audio_vae" "${flags[@]}" --segment_frames "$AUDIO_FRAMES" \
            --max_steps "$total" --eval_steps "$total" --save_steps "$total" \
            --resume_from_checkpoint "runs/${NAME}_audio_vae_crops/checkpoint-${AUDIO_VAE_STEPS}"
}

train_image_vae() {
    stage "image caches (${TRAIN_IMAGES} train, ${VAL_IMAGES} validation, 32x32)" bash -c "
        $PYTHON preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size 32 --split train \
            --max_images $TRAIN_IMAGES --output_dir ${DATA}_images_train --overwrite &&
        $PYTHON preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size 32 --split validation \
            --max_images $VAL_IMAGES --output_dir ${DATA}_images_val --overwrite"
    stage "image VAE (${IMAGE_VAE_STEPS} steps, the settings of bench/wm_recipe.sh)" \
        $PYTHON pretrain_image_vae.py --run_name "${NAME}_image_vae" --config tiny \
            --set "block_out_channels=[32, 64, 64]" --set latent_channels=8 --set reconstruction_loss=l1+mse \
            --batch_size 32 --learning_rate 1e-3 --max_steps "$IMAGE_VAE_STEPS" \
            --train_data_dir "${DATA}_images_train" \
            --val_data_dir "${DATA}_images_val" --eval_steps "$IMAGE_VAE_STEPS" --eval_batches 8 \
            --save_steps "$IMAGE_VAE_STEPS" --save_total_limit 1 --no_progress_bar --overwrite_run
}

if [[ $TRAIN_AUDIO_VAE == 1 && $TRAIN_IMAGE_VAE == 1 ]]; then  # independent: side by side, one process each
    side_by_side "audio VAE" train_audio_vae "image VAE" train_image_vae
else
    [[ $TRAIN_AUDIO_VAE == 0 ]] || train_audio_vae
    [[ $TRAIN_IMAGE_VAE == 0 ]] || train_image_vae
fi

stage "interleaved caches (images and ${AUDIO_REPRESENTATION} clips of ${AUDIO_FRAMES} mel frames, BPE)" bash -c "
    $PYTHON preprocess_multimodal_dataset.py --split train --dataset_name builtin:shapes --image_size 32 \
        --max_images $TRAIN_IMAGES --vae_checkpoint $IMAGE_VAE_CHECKPOINT --audio_cache_dir ${DATA}_utterances_train \
        ${AUDIO_FLAGS[*]} --train_tokenizer --vocab_size 512 --output_dir ${DATA}_train --overwrite &&
    $PYTHON preprocess_multimodal_dataset.py --split validation --dataset_name builtin:shapes --image_size 32 \
        --max_images $VAL_IMAGES --vae_checkpoint $IMAGE_VAE_CHECKPOINT --audio_cache_dir ${DATA}_utterances_val \
        ${AUDIO_FLAGS[*]} --tokenizer ${DATA}_train/tokenizer --output_dir ${DATA}_val --overwrite"

stage "world model (${CONFIG}, ${WM_STEPS} steps)" \
    $PYTHON pretrain_wm.py --run_name "$WM_RUN" --config "$CONFIG" --batch_size "$WM_BATCH" \
        --learning_rate "${WM_LR:-1e-3}" --max_steps "$WM_STEPS" --train_data_dir "${DATA}_train" \
        --val_data_dir "${DATA}_val" --eval_steps "$WM_STEPS" --eval_batches 8 --eval_thinking_steps 1 2 4 8 \
        --save_steps "$WM_STEPS" --save_total_limit 1 --sample_guidance_scales 1 3 --sample_steps "$SAMPLE_STEPS" \
        "${VOCODER_FLAGS[@]}" --no_progress_bar --overwrite_run

stage "recognition and text-to-speech" \
    $PYTHON bench/wm_speech_eval.py --run_dir "runs/$WM_RUN" --val_data_dir "${DATA}_val" --clips "$CLIPS" \
        --prompts "$PROMPTS" --steps "$SAMPLE_STEPS" "${VOCODER_FLAGS[@]}"

stage "speech judges: pocketsphinx WER and the speaker judge, generated against the real clips decoded back" \
    $PYTHON bench/speech_judges.py --listing "runs/$WM_RUN/wm_speech_eval/prompts.tsv" --centroid_items "$CENTROID_ITEMS"

stage "captioning and text-to-image" \
    $PYTHON bench/wm_shapes_eval.py --run_dir "runs/$WM_RUN" --captions "$CAPTIONS" --guidance_scales 1 2 4 \
        --specs_per_color "$SPECS_PER_COLOR" --num_images 1 --steps "$SAMPLE_STEPS"

echo
echo "recipe done in $((SECONDS - started)) s: runs/$WM_RUN, runs/$WM_RUN/wm_speech_eval/, runs/$WM_RUN/wm_eval/"
