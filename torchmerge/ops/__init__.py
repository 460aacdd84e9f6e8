"""torchmerge native ops: schemas, fake impls, reference semantics and the _C.so kernel loader.

Families (each module defines its ops with ``_loader.define_op``; imported explicitly here):
  * ``intlinear``    — int8_linear, requantize                    (I-ViT / I-BERT integer-only)
  * ``intnonlinear`` — shiftmax, shift_gelu, i_gelu, i_exp, isqrt, i_layernorm
  * ``lmul``, ``lut`` — L-Mul and T-MAC LUT families
  * ``merge_kernels`` — merge_delta, merge_axpy_delta_ (fused streaming-merge arithmetic)
Quantisation helpers and observers live in ``torchmerge.ops.quant``.
Call ops as ``torch.ops.torchmerge.<name>``; the reference of each is ``torchmerge.ops.reference.<name>``.
"""

from __future__ import annotations

from . import _loader
from . import intlinear, intnonlinear, quant  # noqa: F401  (define the integer-only family)
from . import topk_mask  # noqa: F401  (argsort-exact top-k mask for TIES trimming)
from . import lmul, lut  # noqa: F401  (L-Mul and T-MAC LUT families)
from . import merge_kernels  # noqa: F401  (fused delta / accumulate for streaming merges)

_loader.load_kernels()

reference = _loader.References()
native_available = _loader.native_available
set_cpu_isa = _loader.set_cpu_isa

__all__ = ["intlinear", "intnonlinear", "quant", "reference", "native_available", "set_cpu_isa"]
