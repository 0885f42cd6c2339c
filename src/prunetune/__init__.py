"""prunetune: task-specific structured pruning and adaptive LoRA for Hugging Face transformers 5.

Importing the package registers the ``prunetune_<family>`` model types with the stock Auto classes, so
exported compact models load with ``AutoModelFor...from_pretrained(dir)``.
"""

from prunetune.errors import PrunetuneError
from prunetune.export import load_compact, save_compact
from prunetune.families import FAMILIES, family_of
from prunetune.masks import Masks, attach
from prunetune.plan import Budget, PruningPlan, model_info, select
from prunetune.surgery import apply_plan

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Budget",
    "Masks",
    "PruningPlan",
    "PrunetuneError",
    "apply_plan",
    "attach",
    "family_of",
    "load_compact",
    "model_info",
    "save_compact",
    "select",
]
