"""How much a task needs each head, FFN neuron, hidden dim and layer: scorers with one interface and a registry.

Every scorer states what its numbers estimate (``Scores.meta["unit"]``) and whether its kinds can be ranked
together (``meta["comparable"]``); any normalisation is an explicit option of :func:`compute`, recorded in
``meta["normalize"]``, with the raw scores kept (``Scores.raw()``).

Modules: ``scores`` (Scores, registry, normalisation, block_importance), ``stats`` (ActivationStats),
``passes`` (the shared data loop), ``mask_scorers`` (head_grad, taylor, fisher), ``activation_scorers``
(salience, apt_salience, salience_kurtosis, wanda_sp, flap), ``layer_scorers`` (block_influence),
``magnitude``, ``rescale`` (FLAP's bias compensation, Kwon et al.'s mask rearrangement and rescaling) and
``heatmap``.
"""

from __future__ import annotations

from prunetune.importance import activation_scorers, layer_scorers, magnitude, mask_scorers  # noqa: F401 (register)
from prunetune.importance.activation_scorers import channel_stats
from prunetune.importance.compute import compute
from prunetune.importance.heatmap import heatmap
from prunetune.importance.mask_scorers import mask_gradients
from prunetune.importance.rescale import compensate, kwon_rearrange, kwon_rescale
from prunetune.importance.scores import (
    FIRST_ORDER,
    FISHER,
    NORMALIZE,
    PROXY,
    SCORERS,
    Scores,
    block_importance,
    get_scorer,
    rank_correlation,
    register,
)
from prunetune.importance.stats import ActivationStats

# The scorer of a decoder pruned before training (`apt --prune-before-training`), chosen by measurement
# (benchmarks/llm_pruning.py, README "Decoder pruning against peers"): on SmolLM2 with no training Fisher gave
# the lowest held-out perplexity of every scorer and peer at 80% and 70% of the layer parameters (at 90%,
# block_influence's whole layers are lower: 43.1 against 46.0); salience_kurtosis, APT's own, gave 55.5 against
# Fisher's 13.1 after the same short LoRA run (benchmarks/llama_instruct.py).
DEFAULT_DECODER_SCORER = "fisher"

__all__ = [
    "DEFAULT_DECODER_SCORER",
    "FIRST_ORDER", "FISHER", "NORMALIZE", "PROXY", "SCORERS", "ActivationStats", "Scores", "block_importance",
    "channel_stats", "compensate", "compute", "get_scorer", "heatmap", "kwon_rearrange", "kwon_rescale",
    "mask_gradients", "rank_correlation", "register",
]
