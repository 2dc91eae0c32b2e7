#!/usr/bin/env bash
# Recipe: the multimodal world model (text + images) on builtin:shapes at 32x32 on a CPU, end to end:
# image caches -> image VAE (the shapes recipe's: f4, 32x32 images -> 8x8x8 latents) -> interleaved caches (a BPE
# trained on the captions, both orders per image) -> world model (multimodal/tiny) -> captioning and text-to-image
# (bench/wm_shapes_eval.py). Nothing is downloaded.
#
#   bench/wm_recipe.sh                               # runs/shapes_wm_vae, runs/shapes_wm, cached_datasets/shapes_wm_*
#   VAE_CHECKPOINT=runs/shapes_vae/checkpoint-1800 bench/wm_recipe.sh    # reuse the VAE of bench/shapes_recipe.sh
#   ATTENTION=causal WM_RUN=shapes_wm_causal bench/wm_recipe.sh          # the ablation: causal inside the image
#   DRY_RUN=1 bench/wm_recipe.sh                     # a few steps per stage, to check the plumbing
#
# Every stage prints its wall time. The stage sizes are environment variables. OMP_NUM_THREADS defaults to 1.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NAME=shapes_wm_dry TRAIN_IMAGES=${TRAIN_IMAGES:-256} VAL_IMAGES=${VAL_IMAGES:-64} VAE_STEPS=${VAE_STEPS:-20}
    WM_STEPS=${WM_STEPS:-40} CAPTIONS=${CAPTIONS:-20} SPECS_PER_COLOR=${SPECS_PER_COLOR:-1} IMAGES_PER_PROMPT=1
else
    NAME=shapes_wm TRAIN_IMAGES=${TRAIN_IMAGES:-4000} VAL_IMAGES=${VAL_IMAGES:-500} VAE_STEPS=${VAE_STEPS:-1800}
    WM_STEPS=${WM_STEPS:-4000} CAPTIONS=${CAPTIONS:-200} SPECS_PER_COLOR=${SPECS_PER_COLOR:-4}
    IMAGES_PER_PROMPT=${IMAGES_PER_PROMPT:-2}
fi
SIZE=32
DATA=cached_datasets/${NAME}
WM_RUN=${WM_RUN:-${NAME}}
ATTENTION=${ATTENTION:-bidirectional}
VAE_FLAGS=(--config tiny --set "block_out_channels=[32, 64, 64]" --set latent_channels=8
           --set reconstruction_loss=l1+mse --batch_size 32 --learning_rate 1e-3)
# the tiny world model (hidden 128, 4 layers) over the VAE's 8x8x8 latents in 2x2 patches (16 positions)
WM_FLAGS=(--config multimodal/tiny --set "media={image: {attention: ${ATTENTION}}}"
          --batch_size ${WM_BATCH:-32} --learning_rate ${WM_LR:-1e-3})

source bench/recipe_stages.sh  # stage NAME COMMAND...: run it and print its wall time

if [[ -z "${VAE_CHECKPOINT:-}" ]]; then
    VAE_CHECKPOINT=runs/${NAME}_vae/checkpoint-${VAE_STEPS}
    stage "image caches (${TRAIN_IMAGES} train, ${VAL_IMAGES} validation, ${SIZE}x${SIZE})" bash -c "
        $PYTHON preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size $SIZE --split train \
            --max_images $TRAIN_IMAGES --output_dir ${DATA}_images_train --overwrite &&
        $PYTHON preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size $SIZE --split validation \
            --max_images $VAL_IMAGES --output_dir ${DATA}_images_val --overwrite"
    stage "image VAE (${VAE_STEPS} steps)" \
        $PYTHON pretrain_image_vae.py --run_name "${NAME}_vae" "${VAE_FLAGS[@]}" --max_steps "$VAE_STEPS" \
            --train_data_dir "${DATA}_images_train" --val_data_dir "${DATA}_images_val" --eval_steps "$VAE_STEPS" \
            --eval_batches 8 --save_steps "$VAE_STEPS" --save_total_limit 1 --no_progress_bar --overwrite_run
fi

if [[ ! -f "${DATA}_train/meta.json" || "${OVERWRITE_CACHES:-1}" == 1 ]]; then
    stage "interleaved caches (BPE on the captions, both orders)" bash -c "
        $PYTHON preprocess_multimodal_dataset.py --split train --dataset_name builtin:shapes --image_size $SIZE \
            --max_images $TRAIN_IMAGES --vae_checkpoint $VAE_CHECKPOINT --train_tokenizer --vocab_size 512 \
            --output_dir ${DATA}_train --overwrite &&
        $PYTHON preprocess_multimodal_dataset.py --split validation --dataset_name builtin:shapes --image_size $SIZE \
            --max_images $VAL_IMAGES --vae_checkpoint $VAE_CHECKPOINT --tokenizer ${DATA}_train/tokenizer \
            --output_dir ${DATA}_val --overwrite"
fi

stage "world model (${WM_STEPS} steps, attention inside images: ${ATTENTION})" \
    $PYTHON pretrain_wm.py --run_name "$WM_RUN" "${WM_FLAGS[@]}" --max_steps "$WM_STEPS" \
        --train_data_dir "${DATA}_train" --val_data_dir "${DATA}_val" --eval_steps "$WM_STEPS" --eval_batches 8 \
        --save_steps "$WM_STEPS" --save_total_limit 1 --sample_guidance_scales 1 3 --sample_steps 10 \
        --no_progress_bar --overwrite_run

stage "captioning and text-to-image" \
    $PYTHON bench/wm_shapes_eval.py --run_dir "runs/$WM_RUN" --captions "$CAPTIONS" --guidance_scales 1 2 4 \
        --specs_per_color "$SPECS_PER_COLOR" --num_images "$IMAGES_PER_PROMPT" --steps 25

echo
echo "recipe done in $((SECONDS - started)) s: runs/$WM_RUN, runs/$WM_RUN/wm_eval/"
