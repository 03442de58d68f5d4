"""Probes: mergeable accumulators (update / merge / finalize / state_dict) fed by the lockstep runner.

Token metrics, llama.cpp's KLD statistics and shifted tokens take the vocab probe's [N] outputs; hidden similarity
and PCA take per-layer states; the logit lens (lens.py) takes chosen per-layer states and the models' norms and heads.
"""
from driftscope.probes.base import Accumulator, load_state, save_state
from driftscope.probes.hidden_similarity import HiddenSimilarity
from driftscope.probes.kld_stats import KLDStats
from driftscope.probes.lens import LensDrift, LensHeads
from driftscope.probes.pca import PaperPCAShift, StreamingPCA
from driftscope.probes.shifted_tokens import ShiftedTokens
from driftscope.probes.token_metrics import TokenMetrics

__all__ = ["Accumulator", "save_state", "load_state", "TokenMetrics", "KLDStats", "ShiftedTokens", "HiddenSimilarity",
           "PaperPCAShift", "StreamingPCA", "LensDrift", "LensHeads"]
