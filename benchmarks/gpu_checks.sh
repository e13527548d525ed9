#!/usr/bin/env bash
# Every check of DreamShot that needs a GPU, in one run: training throughput, MFU and peak memory of the 1.3B and
# 14B Wan at 480p with 8 shots + 3 references (DeepSpeed ZeRO-2, eager and with compiled blocks, side by side;
# plain bf16 autocast for 1.3B), then the gpu-marked tests (real DeepSpeed ZeRO-2 / ZeRO-3 training through
# Lightning), then DreamShot side by side with DiffSynth-Studio's training step and diffusers' sampling step
# (benchmarks/peers.py, 1.3B eager and compiled, 14B), then the sampler settings' speed and drift
# (benchmarks/sampling.py: exact savings, compiled blocks, cache hooks, partial guidance, a stacked LoRA with four
# steps; 1.3B in two groups, 14B exact savings only). Each check has its own time limit, so one that hangs does
# not cost the others. Logs: $LOG_DIR (default benchmarks/logs), one file per check; CHECKS="name ..." runs only
# those checks, in the order below.
#
# Context parallelism (issue 17): step time per token and peak memory against the planner, 1.3B and 14B at 480p,
# 8 shots + 3 references and 30 shots + 4 references, bf16 autocast; CP 1 on one GPU, CP 2 / 4 through torchrun
# where the machine has that many GPUs (otherwise the check prints that it was skipped). Goals: GPU-seconds per
# token at CP 4 <= 1.2x CP 1's, memory as the planner says within 10%. One group of its own (limits 720 s on one GPU):
#     CHECKS="cp1_wan1_3b_8 cp1_wan1_3b_30 cp1_wan14b_8 cp1_wan14b_30"
#
# The limits add up to more than one 15-minute device budget: run them in groups, e.g. the peers alone,
#     CHECKS="peers_wan1_3b peers_wan1_3b_compiled peers_wan14b"    (limits 540 s in all),
# which need the bench extra's wheels on the machine (diffsynth, modelscope, pandas: `pip download` them here
# and `pip install --no-index --find-links` there; without them peers.py exits with one line saying so), or the
# sampling checks alone (no extra needed; limits 600 s in all):
#     CHECKS="sampling_wan1_3b sampling_wan1_3b_caches sampling_wan14b"
#
#     bash benchmarks/gpu_checks.sh            # on a machine with one CUDA GPU, from the repository root
set -u
log=${LOG_DIR:-benchmarks/logs}
mkdir -p "$log"
export PYTHONUNBUFFERED=1

check() {  # check NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    [[ -z ${CHECKS:-} || " $CHECKS " == *" $name "* ]] || return 0
    echo "=== $name"
    timeout "$seconds" "$@" >"$log/$name.txt" 2>&1
    echo "exit $? after ${SECONDS}s" >>"$log/$name.txt"
    grep -vE "^\[|^[WI][0-9]{4} |Warning|warn|kept in float32" "$log/$name.txt" | tail -n 25
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, deepspeed, diffusers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'lightning', lightning.__version__)"
} 2>&1 | grep -v "^\[" | tee "$log/machine.txt"

bench=(python benchmarks/train_throughput.py)
check wan1_3b_compiled 240 "${bench[@]}" --model wan1_3b --compile --steps 5 --profile "$log/wan1_3b_compiled_profile.txt"
check wan1_3b_eager 150 "${bench[@]}" --model wan1_3b --steps 5 --profile "$log/wan1_3b_eager_profile.txt"
check pytest_gpu 150 python -m pytest tests/test_strategy.py -m gpu -p no:cacheprovider -q
check wan14b_compiled 300 "${bench[@]}" --model wan14b --compile --steps 3
check wan14b_eager 240 "${bench[@]}" --model wan14b --steps 3
check wan1_3b_autocast 120 "${bench[@]}" --model wan1_3b --zero 0 --steps 5
peers=(python benchmarks/peers.py --device cuda)
check peers_wan1_3b 150 "${peers[@]}" --shape wan1_3b --profile "$log/peers_wan1_3b_profile"
check peers_wan1_3b_compiled 150 "${peers[@]}" --shape wan1_3b --compile --rows train
check peers_wan14b 240 "${peers[@]}" --shape wan14b --steps 2 --sample-calls 1 --sample-steps 2
cp=(benchmarks/train_throughput.py --zero 0)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
for degree in 1 2 4; do
    if ((gpus < degree)); then
        echo "=== cp${degree}_*: skipped, needs $degree GPUs (this machine has $gpus)"
        continue
    fi
    run=(python "${cp[@]}")
    ((degree > 1)) && run=(torchrun --nproc-per-node "$degree" "${cp[@]}")
    check "cp${degree}_wan1_3b_8" 90 "${run[@]}" --model wan1_3b --shots 8 --refs 3 --steps 3
    check "cp${degree}_wan1_3b_30" 150 "${run[@]}" --model wan1_3b --shots 30 --refs 4 --steps 2
    check "cp${degree}_wan14b_8" 180 "${run[@]}" --model wan14b --shots 8 --refs 3 --steps 2
    check "cp${degree}_wan14b_30" 300 "${run[@]}" --model wan14b --shots 30 --refs 4 --steps 1
done
sampling=(python benchmarks/sampling.py --device cuda --rounds 1 --out "$log")
check sampling_wan1_3b 240 "${sampling[@]}" --shape wan1_3b --steps 10 --settings per_step,exact,compiled,guide_half,few_step
check sampling_wan1_3b_caches 150 "${sampling[@]}" --shape wan1_3b --steps 10 --settings exact,fbc_01,taylorseer,fast --no-diffusers
check sampling_wan14b 210 "${sampling[@]}" --shape wan14b --steps 4 --settings per_step,exact --no-diffusers
