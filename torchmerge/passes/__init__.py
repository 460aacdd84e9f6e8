"""torchmerge.passes: graph passes over captured ATen GraphModules (folding now; lowering reads a PrecisionPlan)."""

from .dce import DeadCodeElimination
from .fold_batchnorm import FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_lora import FoldLoRA
from .fold_merged_weights import FoldMergedWeights

__all__ = ["DeadCodeElimination", "FoldBatchNorm", "FoldConstants", "FoldLoRA", "FoldMergedWeights"]
