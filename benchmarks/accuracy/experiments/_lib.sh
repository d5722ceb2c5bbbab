# Shared by the ablation scripts here (source it after setting books, work and out).
here=$(dirname "${BASH_SOURCE[0]}")
# recipe.NESTED's first three keys (the older ablations ran them with LeMo's dense layers), and all of recipe.NESTED.
nested='"loss_tokens": "processed", "nested_selection": true, "selection_window": 8'
nested_first_half="$nested, \"dense_layers\": \"first_half\""

# lossonly KEEP: the "lossonly" mode (JSON): only the last of the 12 layers sparse at KEEP, processed loss, window 8;
# what learning from that share of the targets alone costs (the floor).
lossonly() {
  printf '{"keep_ratio": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, %s], "loss_tokens": "processed", "selection_window": 8}' "$1"
}

# accuracy_run MODES_JSON RUNS_JSON [run.py options...]: run.py with these modes and runs instead of the recipe's.
accuracy_run() {
  python3 "$here/../run.py" --books "$books" --work "$work" --out "$out" \
    --set "modes=$(echo "$1" | tr -d '\n')" --set "runs=$(echo "$2" | tr -d '\n')" "${@:3}"
}

# selection_bias_both: selection_bias.py on the extended model, with LeMo's dense layers and with "first_half".
selection_bias_both() {
  for layers in auto first_half; do
    python3 "$here/../selection_bias.py" --model "$work/extended" --heldout "$work/books/heldout" \
      --seq-len 8192 --rows 16 --dense-layers "$layers" --out "$out/selection-bias-$layers.json"
  done
}

# Reference D's recipe fields (retrieval.sh; with rope_scaling "yarn"): 2400 pretraining steps, half of the rows one
# repeated window of the books, a fifth passkey documents; 500 fine-tuning steps, 60 held-out passkey rows per depth,
# predictors calibrated in each run.
reference_d=(--set predictor_batches=0 --set pretrain_steps=2400 --set pretrain_induction_rate=0.5
             --set 'pretrain_induction_source="books"' --set pretrain_passkey_rate=0.2 --set finetune_steps=500
             --set passkey_rows=60)
