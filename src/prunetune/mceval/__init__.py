"""Multiple-choice benchmarks (ARC, HellaSwag, MMLU, TruthfulQA) scored by lm-evaluation-harness on local files.

``evaluate(model, tokenizer, "arc_easy,hellaswag")`` runs the harness on any causal LM object (pruned or not);
``reference`` recomputes its per-item figures independently (the check that the harness ran as defined).
"""

from prunetune.mceval.benchmarks import BENCHMARKS, parse
from prunetune.mceval.harness import evaluate

__all__ = ["BENCHMARKS", "evaluate", "parse"]
