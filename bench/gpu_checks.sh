#!/usr/bin/env bash
# The GPU checks of the optimizer step, as one command for a lent device (an H100 or H200):
#   bash bench/gpu_checks.sh        # writes gpu_checks.log and three JSON files under $OUT (else runs/gpu_checks)
# 1. the suite's CUDA cases (the fused step equals the reference path on the device; GPU rules);
# 2. bench/host_cost.py on the device: 16 and 224 bodies and one LLaMA-2 7B FSDP2 rank at full
#    size, MLorc-AdamW fused and reference against torch AdamW foreach and fused;
# 3. bench/optimizer_step.py: four 4096^2 matrices, rank 4;
# 4. bench/cuda_oracle.py: full-rank MLorc-AdamW tracks AdamW on the device;
# 5. bench/cuda_graph_probe.py: whether one step can be captured by a CUDA graph.
# Each step has its own time limit (a slow compile cannot take the others' time); all of them
# end within 9 minutes. PYTHON picks the interpreter (default python3).
set -uo pipefail
out=${OUT:-runs/gpu_checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/gpu_checks.log"
: > "$log"
check() {                # check NAME SECONDS COMMAND...: runs it, logs it, never stops the others
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s" | tee -a "$log"
}
check device 30 "$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, 'GiB')"
check cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_optim.py -k cuda
check host_cost 180 "$py" bench/host_cost.py --device cuda --scale 1 --counts 16 224 --repeats 20 \
    --out "$out/host_cost_cuda.json"
check step_4096 100 "$py" bench/optimizer_step.py --device cuda --sizes 4096 --ranks 4 --repeats 10 \
    --only adamw-fused mlorc-adamw "mlorc-adamw fused" "mlorc-adamw reference" --out "$out/step_cuda.json"
check oracle 45 "$py" bench/cuda_oracle.py
check graph_probe 60 "$py" bench/cuda_graph_probe.py --out "$out/cuda_graph_probe.json"
grep -E "^== |passed|failed|error" "$log"
