"""The sparse core: which blocks a sparse layer keeps and the bookkeeping around running it on them, shared by the
Hugging Face layer (``lemo_ds.decoder_layer``) and the Megatron-core layer (``lemo_ds.megatron.layer``).

- ``selection``: the selection rule (block counts, forced blocks, top-k, stratified windows, kept rows);
- ``recompute``: the selections kept for an activation checkpoint's recompute;
- ``plan``: ``SparsePlan``, one per sparse layer, which applies both in a stated order.
"""
