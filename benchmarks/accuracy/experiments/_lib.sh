# Shared by the ablation scripts here (source it after setting books, work and out).
here=$(dirname "${BASH_SOURCE[0]}")
# recipe.NESTED's first three keys (its dense_layers is added by the scripts that want it).
nested='"loss_tokens": "processed", "nested_selection": true, "selection_window": 8'

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
