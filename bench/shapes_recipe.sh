#!/usr/bin/env bash
# Recipe: builtin:shapes at 32x32 on a CPU, end to end in 26 minutes on a shared 2-core VM without a GPU (about
# 40 when the other jobs there keep both cores busy):
# image caches -> image VAE (f4: 32x32 images -> 8x8x8 latents) -> latent caches (builtin:words captions) ->
# text-conditioned DiT -> caption fidelity (bench/caption_fidelity.py). Nothing is downloaded.
#
#   bench/shapes_recipe.sh              # the full recipe: runs/shapes_{vae,dit}, cached_datasets/shapes_*
#   DRY_RUN=1 bench/shapes_recipe.sh    # a few steps per stage, to check the plumbing (~1 minute):
#                                       # runs/shapes_dry_*, cached_datasets/shapes_dry_*
#   VAE_CHECKPOINT=runs/shapes_wm_vae/checkpoint-1800 DIT_STEPS=20000 SAVE_STEPS=5000 DIT_RUN=shapes_dit_20000 \
#       bench/shapes_recipe.sh          # reuse a VAE (e.g. bench/wm_recipe.sh's); keep every 5000th DiT step
#
# Every stage prints its wall time. The stage sizes below are environment variables (VAE_STEPS=3000 ...).
# One torch thread per process (OMP_NUM_THREADS=1) was the fastest on the shared 2-core VM; set it to the
# number of free cores on a machine of your own. Re-running replaces the runs and caches of the same names.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    NAME=shapes_dry TRAIN_IMAGES=${TRAIN_IMAGES:-256} VAL_IMAGES=${VAL_IMAGES:-64} VAE_STEPS=${VAE_STEPS:-20}
    DIT_STEPS=${DIT_STEPS:-40} SPECS_PER_COLOR=${SPECS_PER_COLOR:-1} IMAGES_PER_PROMPT=${IMAGES_PER_PROMPT:-1}
else
    NAME=shapes TRAIN_IMAGES=${TRAIN_IMAGES:-4000} VAL_IMAGES=${VAL_IMAGES:-500} VAE_STEPS=${VAE_STEPS:-1800}
    DIT_STEPS=${DIT_STEPS:-5000} SPECS_PER_COLOR=${SPECS_PER_COLOR:-4} IMAGES_PER_PROMPT=${IMAGES_PER_PROMPT:-4}
fi
SIZE=32
DATA=cached_datasets/${NAME}
VAE_RUN=${NAME}_vae DIT_RUN=${DIT_RUN:-${NAME}_dit}
TRAIN_VAE=0
if [[ -z "${VAE_CHECKPOINT:-}" ]]; then
    TRAIN_VAE=1 VAE_CHECKPOINT=runs/${VAE_RUN}/checkpoint-${VAE_STEPS}
fi
SAVE_STEPS=${SAVE_STEPS:-$DIT_STEPS}
if (( SAVE_STEPS < 1 || SAVE_STEPS > DIT_STEPS )); then
    echo "SAVE_STEPS must be between 1 and DIT_STEPS ($DIT_STEPS), got $SAVE_STEPS" >&2
    exit 2
fi
# VAE: tiny widened to 32-64-64 (two downsamplings) with 8 latent channels and an L1 + MSE loss (plain L1 leaves
# small shapes their background's colour for longer); DiT: tiny_dit at hidden 128, depth 4 (patch 2: 16 tokens)
VAE_FLAGS=(--config tiny --set "block_out_channels=[32, 64, 64]" --set latent_channels=8
           --set reconstruction_loss=l1+mse --batch_size 32 --learning_rate 1e-3)
DIT_FLAGS=(--diffusion_type tiny_dit --set hidden_size=128 --set depth=4 --ema_decay 0.999 --batch_size 64
           --learning_rate 5e-4)

source bench/recipe_stages.sh  # stage NAME COMMAND...: run it and print its wall time

stage "image caches (${TRAIN_IMAGES} train, ${VAL_IMAGES} validation, ${SIZE}x${SIZE})" bash -c "
    $PYTHON preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size $SIZE --split train \
        --max_images $TRAIN_IMAGES --output_dir ${DATA}_train_$SIZE --overwrite &&
    $PYTHON preprocess_image_vae_dataset.py --dataset_name builtin:shapes --image_size $SIZE --split validation \
        --max_images $VAL_IMAGES --output_dir ${DATA}_val_$SIZE --overwrite"

if [[ $TRAIN_VAE == 1 ]]; then
    stage "image VAE (${VAE_STEPS} steps)" \
        $PYTHON pretrain_image_vae.py --run_name "$VAE_RUN" "${VAE_FLAGS[@]}" --max_steps "$VAE_STEPS" \
            --train_data_dir "${DATA}_train_$SIZE" --val_data_dir "${DATA}_val_$SIZE" --eval_steps 500 \
            --eval_batches 8 --save_steps "$VAE_STEPS" --save_total_limit 1 --no_progress_bar --overwrite_run
fi

stage "latent caches (builtin:words)" bash -c "
    $PYTHON preprocess_image_diffusion_dataset.py --split train --image_cache_dir ${DATA}_train_$SIZE \
        --text_encoder builtin:words --vae_checkpoint $VAE_CHECKPOINT --output_dir ${DATA}_train_latents \
        --overwrite &&
    $PYTHON preprocess_image_diffusion_dataset.py --split validation --image_cache_dir ${DATA}_val_$SIZE \
        --text_encoder builtin:words --vae_checkpoint $VAE_CHECKPOINT --output_dir ${DATA}_val_latents --overwrite"

stage "DiT (${DIT_STEPS} steps)" \
    $PYTHON pretrain_image_diffusion.py --run_name "$DIT_RUN" "${DIT_FLAGS[@]}" --max_steps "$DIT_STEPS" \
        --train_data_dir "${DATA}_train_latents" --val_data_dir "${DATA}_val_latents" --eval_steps 1000 \
        --eval_batches 4 --save_steps "$SAVE_STEPS" --save_total_limit $((DIT_STEPS / SAVE_STEPS)) \
        --sample_guidance_scales 1 4 \
        --no_progress_bar --overwrite_run

stage "caption fidelity" \
    $PYTHON bench/caption_fidelity.py --run_dir "runs/$DIT_RUN" --guidance_scales 1 2 4 \
        --specs_per_color "$SPECS_PER_COLOR" --num_images "$IMAGES_PER_PROMPT" --steps 25

echo
echo "recipe done in $((SECONDS - started)) s: $VAE_CHECKPOINT, runs/$DIT_RUN, runs/$DIT_RUN/caption_fidelity/"
