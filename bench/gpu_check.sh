#!/usr/bin/env bash
# The GPU figures of issue 15 in one run of a few minutes, on a machine with one CUDA GPU:
#
#   tests   the test suite's CUDA paths (pytest -k cuda), compiled decoding on CUDA graphs included
#   train   pretrain_wm.py on modern_small in bf16 for a few dozen steps: plain, plain --torch_compile, and under
#           `deepspeed --num_gpus=1` with ZeRO-2; tokens/s and MFU as each run logged them (bench/run_speed.py)
#   mfu     bench/lm_throughput.py: modern_medium at sequence 2048 in bf16, ours eager and compiled against HF's
#           LlamaForCausalLM of the same shape (training MFU), and decode tokens/s against HF (default and
#           static cache + compile)
#   adamw   bench/adamw_speed.py: the loop's fused AdamW against PyTorch's default (foreach on CUDA) on modern_medium,
#           the step alone and in a bf16 training step
#   dit     bench/dit_speed.py: our DiT's training step against diffusers' PixArt of the same size
#   vocoder bench/vocoder_speed.py: our vocoders against Vocos' generator
#
#   bench/gpu_check.sh [PART ...]                 # on the GPU machine: all parts, or the ones named
#   CPU_SMOKE=1 PYTHON=.venv/bin/python bench/gpu_check.sh   # here, on CPU: every part with tiny sizes
#   bench/gpu_check.sh --fetch-wheels             # here, before: the packages the GPU image lacks, into .whl/
#
# The device tool allows 10 minutes a command and about 15 minutes a session, start-up included: run it as two
# commands, `bench/gpu_check.sh tests train` and then `bench/gpu_check.sh mfu adamw dit vocoder` (the second
# finds the first's installs gone on a fresh machine and installs them again from .whl/).
#
# The GPU machine's image (Python 3.12) has torch, torchaudio, transformers and tensorboard but not DeepSpeed,
# diffusers, Vocos and a few small packages. `--fetch-wheels` downloads them here with pip into .whl/ (which
# .gitignore lists, so it travels only when named: carry [".whl"] in the device run), and this
# script installs them into /tmp/site first. A part whose packages are still missing is skipped with a line
# that says so. Output: stdout, and everything in $OUT/gpu_check.log (or bench/out/gpu_check.log).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=${CPU_SMOKE:-0}
LOG_DIR=${OUT:-bench/out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
mkdir -p "$LOG_DIR" "$WORK"
# name==version:module of each package the GPU image may lack (the versions of the tested venv)
WHEELS="deepspeed==0.19.8:deepspeed hjson==3.1.0:hjson pydantic==2.14.4:pydantic pydantic-core==2.50.5:pydantic_core
annotated-types==0.8.0:annotated_types typing-inspection==0.4.5:typing_inspection diffusers==0.42.1:diffusers
importlib-metadata==10.2.0:importlib_metadata vocos==0.1.0:vocos encodec==0.1.1:encodec soundfile==0.14.0:soundfile
cffi==2.1.1:cffi pycparser==3.12:pycparser pesq==0.0.4:pesq pystoi==0.4.1:pystoi"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    for entry in $WHEELS; do
        spec=${entry%%:*}
        # a wheel for the GPU image's CPython 3.12 on x86-64, else the source archive (DeepSpeed, encodec and pesq ship
        # only that; the install below builds it there without build isolation; --no-binary names the package alone,
        # so that pip may prepare it with its build requirements as wheels)
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec" 2>/dev/null \
        || "$PY" -m pip download -q --no-deps --no-binary="${spec%%==*}" -d .whl "$spec" 2>/dev/null \
        || echo "could not download $spec"
    done
    ls -la .whl
    exit 0
fi

PARTS=${*:-tests train mfu adamw dit vocoder}
exec > >(tee -a "$LOG_DIR/gpu_check.log") 2>&1
echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') parts: $PARTS (CPU_SMOKE=$SMOKE)"

if [ -d .whl ] && ls .whl/* >/dev/null 2>&1; then
    # install only what is missing, beside the image's packages
    missing=()
    for entry in $WHEELS; do
        "$PY" -c "import ${entry##*:}" 2>/dev/null || missing+=(".whl/$(ls .whl | grep -i "^$(echo "${entry%%==*}" | tr - _)-\|^${entry%%==*}-" | head -1)")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site "${missing[@]}" \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "WARNING: installing ${missing[*]} failed"
    fi
fi
"$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("transformers", "deepspeed", "diffusers", "vocos", "tensorboard", "soundfile"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as error:  # a missing or broken package: its part is skipped
        print(f"  {name} MISSING ({type(error).__name__}: {str(error)[:80]})")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

has() { "$PY" -c "import $1" 2>/dev/null; }
# run NAME TIMEOUT_S COMMAND...: one step, its exit status and seconds; a failure does not stop the others
run() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo; echo "== $name: $*"
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo " (timed out at $limit s)")"
}
export PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu; DTYPE=float32; LM=tiny; TRAIN_STEPS=3; SEQ=64; BATCH=2; MFU_SEQ=64; MFU_BATCH=2; REPEATS=1
    DEVICE_FLAGS=(--device cpu); MIXED=(); DS_CONFIG=ds_config_zero-2.json
else
    DEVICE=cuda; DTYPE=bfloat16; LM=modern_small; TRAIN_STEPS=40; SEQ=1024; BATCH=16; MFU_SEQ=2048; MFU_BATCH=8
    REPEATS=5; DEVICE_FLAGS=(); MIXED=(--bf16); DS_CONFIG=ds_config_zero-2.json
fi

for part in $PARTS; do
  case $part in
  tests)
    # every test whose name or parameters mention cuda (they skip on a machine without one)
    # no -x: a test module whose imports the image lacks (pesq, speechbrain, ...) is a collection error, which -x
    # would turn into a stop before any test ran
    run tests 240 "$PY" -m pytest -q -k cuda --continue-on-collection-errors -p no:cacheprovider tests ;;
  train)
    cache=$WORK/text_cache
    [ -f "$cache/meta.json" ] || run text_cache 180 "$PY" preprocess_text_dataset.py --dataset_name builtin:text \
        --max_chars $([ "$SMOKE" = 1 ] && echo 200000 || echo 3000000) --train_tokenizer --vocab_size 8192 \
        --output_dir "$cache"
    common=(--config $LM --data_dir "$cache" --runs_dir "$WORK/runs" --overwrite_run --max_steps $TRAIN_STEPS
            --batch_size $BATCH --seq_len $SEQ --logging_steps $([ "$SMOKE" = 1 ] && echo 1 || echo 10)
            --eval_steps 100000 --save_steps 100000 --eval_batches 2 --sample_max_new_tokens 8 --no_progress_bar
            "${DEVICE_FLAGS[@]}" "${MIXED[@]}")
    run train_plain 150 "$PY" pretrain_wm.py --run_name plain "${common[@]}"
    run train_plain_compiled 240 "$PY" pretrain_wm.py --run_name plain_compiled --torch_compile "${common[@]}"
    if has deepspeed; then
        # the launcher as a module: a --target install puts no `deepspeed` script on PATH (on CPU: one gloo rank)
        run train_deepspeed 200 "$PY" -m deepspeed.launcher.runner --num_gpus=1 --master_port 29611 pretrain_wm.py \
            --run_name deepspeed --use_deepspeed --deepspeed_config $DS_CONFIG "${common[@]}"
    else
        echo "SKIP train_deepspeed: deepspeed is not installed (bench/gpu_check.sh --fetch-wheels, carry .whl)"
    fi
    run train_speed 60 "$PY" bench/run_speed.py "$WORK"/runs/plain "$WORK"/runs/plain_compiled "$WORK"/runs/deepspeed ;;
  mfu)
    if [ "$SMOKE" = 1 ]; then size=(--config tiny --threads 1); else size=(--config modern_medium); fi
    run mfu 420 "$PY" bench/lm_throughput.py "${size[@]}" --device $DEVICE --dtype $DTYPE --seq-len $MFU_SEQ \
        --batch-size $MFU_BATCH --gen-batch-size 4 --prompt-len 32 --new-tokens $([ "$SMOKE" = 1 ] && echo 8 || echo 128) \
        --warmup 1 --steps $REPEATS --compile ;;
  adamw)
    if [ "$SMOKE" = 1 ]; then size=(--config tiny --threads 1 --batch-size 2 --seq-len 64); else
        size=(--config modern_medium --vocab-size 32000 --bf16 --batch-size 8 --seq-len 2048); fi
    run adamw 120 "$PY" bench/adamw_speed.py "${size[@]}" --device $DEVICE --warmup 1 --steps $REPEATS ;;
  dit)
    if has diffusers; then
        if [ "$SMOKE" = 1 ]; then size=(--config tiny_dit --depth 2 --latent-size 8 --threads 1); \
        else size=(--config small_dit --depth 12 --latent-size 32 --batch-size 32); fi
        run dit 150 "$PY" bench/dit_speed.py "${size[@]}" --device $DEVICE --dtype $DTYPE --warmup 1 --steps $REPEATS
    else
        echo "SKIP dit: diffusers is not installed (bench/gpu_check.sh --fetch-wheels, carry .whl)"
    fi ;;
  vocoder)
    if has vocos; then
        if [ "$SMOKE" = 1 ]; then size=(--configs tiny_lightheaded_freq_domain_vocoder --seconds 0.5 --train-seconds 0.25
                                        --threads 1); else size=(--seconds 10 --train-seconds 2); fi
        run vocoder 150 "$PY" bench/vocoder_speed.py "${size[@]}" --device $DEVICE --warmup 1 --repeats $REPEATS
    else
        echo "SKIP vocoder: vocos is not installed (bench/gpu_check.sh --fetch-wheels, carry .whl)"
    fi ;;
  *) echo "unknown part '$part': the parts are tests train mfu adamw dit vocoder"; exit 2 ;;
  esac
done
echo; echo "== gpu_check done $(date -u '+%H:%M UTC')"
