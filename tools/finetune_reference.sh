#!/usr/bin/env bash
# The anchor-tuned reference model and its control, side by side on one GPU (the model is small, the two
# runs share the GPU): the shipped reference model fine-tuned under the anchor pattern (random block
# 1/2..1/8 of the context, anchor 1/4..1 of the block, per sample) and, on the same data and schedule,
# with global attention. Both stop at STEPS or after SECONDS; then the last step that both reached
# and saved is exported in bf16 to OUT/reference-anchor and OUT/reference-global-control.
#   bash tools/finetune_reference.sh OUT [STEPS] [SECONDS]
# FINETUNE_ARGS adds flags to both runs (e.g. "--lengths 512,1024" for a quick CPU check). CONFIG (default
# configs/finetune-reference.toml) and NAME (default reference: OUT/NAME-anchor, OUT/NAME-global-control)
# run another model's recipe the same way (configs/finetune-smollm2.toml, NAME=smollm2). CONTROL=0 skips the
# control (a recipe variant whose control already ran).
set -uo pipefail
out=$1 steps=${2:-400} seconds=${3:-420}
export PYTHON=${PYTHON:-python3} PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
export NAME=${NAME:-reference}
common=(--config "${CONFIG:-configs/finetune-reference.toml}" --deepspeed '' --wandb '' --steps "$steps" --save-every ${SAVE_EVERY:-25}
        --keep-last 1000 --log-every 10 --quiet ${FINETUNE_ARGS:-})
timeout "$seconds" $PYTHON launch/finetune.py "${common[@]}" --attention star --out "$out/star" > "$out/star.log" 2>&1 &
runs="star"
if [ "${CONTROL:-1}" != 0 ]; then
    runs="star global"
    timeout "$seconds" $PYTHON launch/finetune.py "${common[@]}" --attention global --global-fraction 0 --out "$out/global" > "$out/global.log" 2>&1 &
fi
wait
RUNS=$runs RECIPE="bash tools/finetune_reference.sh $* (CONFIG=${CONFIG:-configs/finetune-reference.toml} NAME=$NAME CONTROL=${CONTROL:-1} FINETUNE_ARGS='${FINETUNE_ARGS:-}' SAVE_EVERY=${SAVE_EVERY:-25})" \
$PYTHON - "$out" <<'PY'
import glob, json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
steps = lambda run: {int(p.rsplit("-", 1)[1]) for p in glob.glob(f"{out}/{run}/checkpoint-*")}
runs = os.environ["RUNS"].split()
common = sorted(set.intersection(*(steps(run) for run in runs)))
assert common, f"no step was saved by every run of {runs}"
step = common[-1]
prefix = os.environ["NAME"]
names = {"star": f"{prefix}-anchor", "global": f"{prefix}-global-control"}
for run, name in ((run, names[run]) for run in runs):
    src = f"{out}/{run}/checkpoint-{step:07d}"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(f"{out}/{name}")
    AutoTokenizer.from_pretrained(src).save_pretrained(f"{out}/{name}")
    rows = [json.loads(l) for l in open(f"{out}/{run}/train_log.jsonl")]
    with open(f"{out}/{name}/training_log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
    config = json.load(open(f"{src}/trainer_state.json"))["config"]
    json.dump({"run": run, "step": step, "from": config["model"], "command": os.environ["RECIPE"],
               "config": config}, open(f"{out}/{name}/recipe.json", "w"), indent=1)
    print(name, "step", step, "MB", round(os.path.getsize(f"{out}/{name}/model.safetensors") / 2**20, 1))
PY
