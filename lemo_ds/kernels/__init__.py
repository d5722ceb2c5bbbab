"""Triton kernels of lemo_ds (installed as ``lemo_ds.kernels``), each with a plain-torch reference beside it.

- :func:`gather_rows`: gather the kept token rows of the hidden states and of RoPE's cos/sin, in one launch.
- :func:`write_back_rows`: write a sparse layer's outputs back into the kept rows of the residual stream.
- :func:`oracle_scores`: LeMo's oracle block scores (and block-pair tile maxima) from queries and keys, fused;
  :func:`allowed_pairs` its one mask predicate (document ids or a model's 4D mask).
- :func:`predictor_scores`: a learned predictor's block scores from the layer input, in two launches.
- :func:`triton_usable`: whether the Triton path can run on given tensors (CUDA, or CPU with TRITON_INTERPRET=1).

Every op takes ``backend="auto" | "triton" | "torch"``; both backends give bit-identical results for the copies
(gather_rows, write_back_rows) and agree to rounding for oracle_scores (see its module docstring).
"""

from .dispatch import resolve_backend, triton_usable
from .gather_rows import gather_rows, gather_rows_ref
from .oracle_scores import allowed_pairs, doc_ids_from_position_ids, oracle_scores, oracle_scores_ref
from .predictor_scores import pack_predictor, predictor_scores, predictor_scores_ref
from .write_back_rows import write_back_rows, write_back_rows_ref

__all__ = [
    "allowed_pairs",
    "doc_ids_from_position_ids",
    "gather_rows",
    "gather_rows_ref",
    "oracle_scores",
    "oracle_scores_ref",
    "pack_predictor",
    "predictor_scores",
    "predictor_scores_ref",
    "resolve_backend",
    "triton_usable",
    "write_back_rows",
    "write_back_rows_ref",
]
