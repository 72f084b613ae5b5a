# The body of the toy launchers (finetune_toy_branchgrpo.sh, finetune_toy_edit.sh), run with their TOY_BACKBONE
# (toy | toy_edit) and TOY_TRAIN_ARGS (trainer flags before the user's): the backbone's built-in prompts -> embeddings
# through the preprocess step, then GRPO with configs/toy_$ALGO.yaml on the CPU.
#
# Environment: ALGO (branchgrpo), OUTPUT_DIR (outputs/${TOY_BACKBONE}_$ALGO), NPROC (1 process; >1 runs torchrun with
# gloo), CONFIG (configs/toy_$ALGO.yaml), SKIP_SETUP=1 to skip env_setup.sh (booleans: 1/true/yes/on or
# 0/false/no/off). Extra flags go to the trainer ("$@").
source "$REPO_ROOT/scripts/lib/common.sh"

ALGO="${ALGO:-branchgrpo}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/${TOY_BACKBONE}_${ALGO}}"
bg_bool SKIP_SETUP 0
if [[ -n "${CONFIG:-}" ]]; then
  bg_require_file "$CONFIG" "CONFIG: the YAML file of flag values it names"
else
  CONFIG="configs/toy_${ALGO}.yaml"
  bg_require_file "$CONFIG" "ALGO: no toy config for ALGO=$ALGO (configs/toy_*.yaml lists those there are)"
fi
bg_check_inputs
[[ "$SKIP_SETUP" == 1 ]] || bash env_setup.sh
bg_python

# 1. the built-in prompts -> embeddings, through the same preprocess step and format as the large backbones (skipped
#    when done)
for PART in train eval; do
  PROMPTS="$("$PY" -c "from branchgrpo.models import get_backbone as g
print(g('$TOY_BACKBONE').builtin_prompts()[0 if '$PART' == 'train' else 1])")"
  "$PY" -m branchgrpo.cli.preprocess --model "$TOY_BACKBONE" --device cpu --prompts "$PROMPTS" \
    --output_dir "$OUTPUT_DIR/embeddings/$PART" --shard_size 256
done

# 2. GRPO
bg_launch branchgrpo.cli.train --config "$CONFIG" --device cpu "${TOY_TRAIN_ARGS[@]}" \
  --data_json_path "$OUTPUT_DIR/embeddings/train/index.json" \
  --eval_data_json_path "$OUTPUT_DIR/embeddings/eval/index.json" \
  --output_dir "$OUTPUT_DIR" "$@"
