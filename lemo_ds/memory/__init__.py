"""The memory stack: segment loss, compaction, checkpoint offload, tiled MLP (kept-rows checkpoints: decoder_layer)."""
