#!/usr/bin/env bash
# Every check of DreamShot that needs a GPU, in groups that each fit one device call (at most 500 s of check limits,
# so a 600 s call also holds the wheels' install, the machine's line and the kill's grace of a check that hangs). Each
# check has its own time limit, so one that hangs does not cost the others; logs: $LOG_DIR (default
# benchmarks/logs), one file per check.
#
#     CHECKS=first bash benchmarks/gpu_checks.sh     # the default: what the open issues wait for
#     CHECKS="training cp" bash benchmarks/gpu_checks.sh   # groups and single checks, run in the order below
#     LIST=1 CHECKS=all bash benchmarks/gpu_checks.sh      # print the checks and their limits, run nothing
#
# A check past its limit gets SIGTERM, then SIGKILL $grace seconds later: a Python SIGTERM handler (Lightning and
# torchrun install one) runs only when the interpreter gets back control, so a process stuck in a CUDA or NCCL wait
# would otherwise hold the script until the device call ends, and the logs' archive with it.
#
# A device call returns few files: write the logs elsewhere and bring them back as one archive, e.g.
#     LOG_DIR=/tmp/logs bash benchmarks/gpu_checks.sh; tar -czf "$OUT/logs.tgz" -C /tmp logs
#
# Groups, in the order of what they are waited for:
#   first      issue 20 and 19 on the 1.3B at 480p: DreamShot's training step against DiffSynth-Studio's, eager
#              and with compiled blocks (goals <= 1.0x and <= 0.8x), and the sampler's exact savings, compiled
#              blocks, partial guidance and the stacked few-step LoRA against diffusers' WanPipeline
#              (benchmarks/peers.py, benchmarks/sampling.py)
#   training   training throughput, MFU and peak memory against the planner of the 1.3B at 480p with 8 shots +
#              3 references (DeepSpeed ZeRO-2 compiled and eager, plain bf16 autocast), then the gpu-marked tests
#              (real ZeRO-2 / ZeRO-3 training through Lightning)
#   training14b  the same for the 14B, compiled and eager
#   more       the peers on the 14B; the sampler's cache hooks and `--preset fast` on the 1.3B; its exact
#              savings on the 14B
#   cp         context parallelism (issue 17): step time per token and peak memory against the planner, 1.3B and
#              14B at 480p, 8 shots + 3 references and 30 shots + 4 references, bf16 autocast; CP 1 on one GPU
#   cp2, cp4   the same at CP 2 and CP 4 through torchrun, where the machine has that many GPUs (otherwise each
#              check says it was skipped). Goals: GPU-seconds per token at CP 4 <= 1.2x CP 1's, memory as the
#              planner says within 10%.
#   all        every group above
#
# The machine has no network: run `python benchmarks/gpu_wheels.py` here first, which puts into .whl/ what the
# checks import beyond the machine's image (diffusers, DeepSpeed, omegaconf, the bench extra: 24 MiB), and carry
# .whl; this script installs it into /tmp/site. The repository root goes on PYTHONPATH (the machine's Python 3.12
# is outside this project's pinned range, so it is not pip-installed there).
set -u
log=${LOG_DIR:-benchmarks/logs}
py=${PYTHON:-python3}
listing=${LIST:-}
grace=10

declare -A group=(
    [first]="peers_wan1_3b peers_wan1_3b_compiled sampling_wan1_3b"
    [training]="wan1_3b_compiled wan1_3b_eager wan1_3b_autocast pytest_gpu"
    [training14b]="wan14b_compiled wan14b_eager"
    [more]="peers_wan14b sampling_wan1_3b_caches sampling_wan14b"
    [cp]="cp1_wan1_3b_8 cp1_wan1_3b_30 cp1_wan14b_8 cp1_wan14b_30"
    [cp2]="cp2_wan1_3b_8 cp2_wan1_3b_30 cp2_wan14b_8 cp2_wan14b_30"
    [cp4]="cp4_wan1_3b_8 cp4_wan1_3b_30 cp4_wan14b_8 cp4_wan14b_30"
)
group[all]="${group[first]} ${group[training]} ${group[training14b]} ${group[more]} ${group[cp]} ${group[cp2]} ${group[cp4]}"
groups="first training training14b more cp cp2 cp4 all"
selected=" "
for word in ${CHECKS:-first}; do
    if [[ -n ${group[$word]:-} ]]; then
        selected+="${group[$word]} "
    elif [[ " ${group[all]} " == *" $word "* ]]; then
        selected+="$word "
    else
        echo "gpu_checks.sh: CHECKS names '$word', which is neither a group ($groups) nor a check" >&2
        exit 2
    fi
done

if [[ -z $listing ]]; then
    mkdir -p "$log"
    export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$py" -c "import torch, deepspeed, diffusers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'lightning', lightning.__version__)"
    } 2>&1 | grep -v "^\[" | tee "$log/machine.txt"
fi
gpus=$( ((${#listing})) && echo 4 || nvidia-smi -L 2>/dev/null | wc -l)

check() {  # check NAME SECONDS [GPUS] COMMAND...: run COMMAND for at most SECONDS if NAME is selected
    local name=$1 seconds=$2 needs=1
    shift 2
    [[ $1 =~ ^[0-9]+$ ]] && needs=$1 && shift
    [[ $selected == *" $name "* ]] || return 0
    if [[ -n $listing ]]; then
        echo "$name $seconds"
        return 0
    fi
    if ((gpus < needs)); then
        echo "=== $name: skipped, needs $needs GPUs (this machine has $gpus)"
        return 0
    fi
    echo "=== $name"
    local start=$SECONDS
    timeout --kill-after "$grace" "$seconds" "$@" >"$log/$name.txt" 2>&1
    echo "exit $? after $((SECONDS - start)) s" >>"$log/$name.txt"
    grep -vE "^\[|^[WI][0-9]{4} |Warning|warn|kept in float32" "$log/$name.txt" | tail -n 25
}

peers=("$py" benchmarks/peers.py --device cuda)
check peers_wan1_3b 150 "${peers[@]}" --shape wan1_3b --profile "$log/peers_wan1_3b_profile"
check peers_wan1_3b_compiled 150 "${peers[@]}" --shape wan1_3b --compile --rows train
sampling=("$py" benchmarks/sampling.py --device cuda --rounds 1 --out "${TMPDIR:-/tmp}/dreamshot_second_lora")
check sampling_wan1_3b 200 "${sampling[@]}" --shape wan1_3b --steps 10 --settings per_step,exact,compiled,guide_half,few_step

bench=("$py" benchmarks/train_throughput.py)
check wan1_3b_compiled 130 "${bench[@]}" --model wan1_3b --compile --steps 5 --profile "$log/wan1_3b_compiled_profile.txt"
check wan1_3b_eager 90 "${bench[@]}" --model wan1_3b --steps 5 --profile "$log/wan1_3b_eager_profile.txt"
check wan1_3b_autocast 150 "${bench[@]}" --model wan1_3b --zero 0 --steps 5
check pytest_gpu 120 "$py" -m pytest tests/test_strategy.py -m gpu -p no:cacheprovider -q
check wan14b_compiled 270 "${bench[@]}" --model wan14b --compile --steps 3
check wan14b_eager 200 "${bench[@]}" --model wan14b --steps 3

check peers_wan14b 200 "${peers[@]}" --shape wan14b --steps 2 --sample-calls 1 --sample-steps 2
check sampling_wan1_3b_caches 120 "${sampling[@]}" --shape wan1_3b --steps 10 --settings exact,fbc_01,taylorseer,fast --no-diffusers
check sampling_wan14b 180 "${sampling[@]}" --shape wan14b --steps 4 --settings per_step,exact --no-diffusers

cp=(benchmarks/train_throughput.py --zero 0)
for degree in 1 2 4; do
    run=("$py" "${cp[@]}")
    ((degree > 1)) && run=("$py" -m torch.distributed.run --nproc-per-node "$degree" "${cp[@]}")
    check "cp${degree}_wan1_3b_8" 70 "$degree" "${run[@]}" --model wan1_3b --shots 8 --refs 3 --steps 3
    check "cp${degree}_wan1_3b_30" 110 "$degree" "${run[@]}" --model wan1_3b --shots 30 --refs 4 --steps 2
    check "cp${degree}_wan14b_8" 120 "$degree" "${run[@]}" --model wan14b --shots 8 --refs 3 --steps 2
    check "cp${degree}_wan14b_30" 200 "$degree" "${run[@]}" --model wan14b --shots 30 --refs 4 --steps 1
done
