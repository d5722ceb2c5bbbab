"""The memory stack: segment loss, sparsity-aware checkpointing (in sparse_layer), tiled MLP."""
