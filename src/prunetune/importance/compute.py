"""Running a registered scorer: option checks, the chosen normalisation and the metadata selection reads."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import family_of, unwrap
from prunetune.importance.passes import labelled
from prunetune.importance.scores import Scores, get_scorer, normalised, scorer_options


def compute(model: nn.Module, batches: Iterable[dict] | None, scorer: str = "head_grad", *, hidden: bool = False,
            normalize: str | None = None, **options) -> Scores:
    """Score `model` with the named scorer; `batches` yield tokenised, labelled dicts (not needed: magnitude).

    `normalize`: "none", "layer" or "kind" (see Scores); None takes the scorer's default (head_grad: "layer",
    as its paper; every other scorer: "none"). Other keyword options go to the scorer (e.g. apt_salience's
    ``kurtosis``, flap's ``bias_compensation``); all of them are recorded in ``meta["options"]``.
    """
    fn = get_scorer(scorer)
    info = fn.info
    top = unwrap(model)
    family_of(top)
    unknown = sorted(set(options) - set(scorer_options(scorer)))
    if unknown:
        takes = ", ".join(scorer_options(scorer)) or "none"
        raise PrunetuneError(f"scorer {scorer!r} has no option {', '.join(unknown)} (its options: {takes})")
    if info.needs_data and batches is None:
        raise PrunetuneError(f"scorer {scorer!r} needs task data")
    how = info.normalize if normalize is None else normalize
    with labelled(f"importance ({scorer})"):
        scores = fn(top, batches, hidden=hidden, **options)
    recorded = {"hidden": hidden, **scorer_options(scorer), **options}
    # an option can change what the numbers are (apt_salience's kurtosis term): the scorer's own word wins
    comparable = scores.meta.get("comparable_override", info.comparable)
    meta = {k: v for k, v in scores.meta.items() if k != "comparable_override"}
    scores.meta = {**meta, "scorer": scorer, "unit": info.unit, "comparable": comparable,
                   "normalize": "none", "options": recorded}
    return normalised(scores, how)
