"""Task metrics: classification and regression from model outputs (scikit-learn, scipy), and extractive QA as the
official SQuAD v2 evaluation script (evaluate-v2.0.py) defines exact match and F1.

Every metric is a fraction in [0, 1] (or a correlation, or an error), like every other prunetune metric: the
official SQuAD script prints the same exact/F1 values multiplied by 100. ROUGE is the exception: its F-measures are
reported x100, the form every summarisation paper and Hugging Face's run_summarization print.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

_Metric = Callable[[np.ndarray, np.ndarray], float]


def compute_metrics(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray, *,
                    regression: bool = False) -> dict[str, float]:
    """Score predictions (logits, class ids or regression scores) with the named metrics.

    "combined" is the average of the others, GLUE's score for tasks with two metrics (MRPC, QQP, STS-B).
    """
    labels = np.asarray(labels)
    outputs = _scores(predictions) if regression else _class_ids(predictions)
    labels = labels.reshape(-1).astype(np.float64 if regression else np.int64)
    if len(outputs) != len(labels):
        raise ValueError(f"got {len(outputs)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot score an empty set of predictions")
    unknown = set(names) - set(METRICS) - {"combined"}
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}, combined")
    results = {name: METRICS[name](outputs, labels) for name in names if name != "combined"}
    if "combined" in names:
        results["combined"] = float(np.mean(list(results.values())))
    return results


def _class_ids(predictions: np.ndarray) -> np.ndarray:
    """Class ids from (N, C) logits, or (N,) integer ids passed through."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        return predictions.argmax(axis=-1)
    if predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
        return predictions
    raise ValueError(f"expected (N, C) logits or (N,) class ids, got shape {predictions.shape}")


def _scores(predictions: np.ndarray) -> np.ndarray:
    """Regression outputs of shape (N,) from (N,) or (N, 1)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        return predictions[:, 0]
    if predictions.ndim == 1:
        return predictions
    raise ValueError(f"expected (N,) or (N, 1) regression outputs, got shape {predictions.shape}")


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(accuracy_score(labels, predictions))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (1), as GLUE reports it for MRPC and QQP."""
    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def _macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur (as labels or predictions)."""
    return float(f1_score(labels, predictions, average="macro", zero_division=0.0))


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation; sklearn already returns 0 when a model predicts a single class."""
    return _finite(matthews_corrcoef(labels, predictions))


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation, 0 when undefined."""
    return _correlation(stats.pearsonr, predictions, labels)


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation, 0 when undefined."""
    return _correlation(stats.spearmanr, predictions, labels)


def _mse(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error (lower is better; NaN outputs give infinity, not a silent 0)."""
    if not np.all(np.isfinite(predictions)):
        return float("inf")
    return float(mean_squared_error(labels, predictions))


def _correlation(
    fn: Callable[[np.ndarray, np.ndarray], object], predictions: np.ndarray, labels: np.ndarray
) -> float:
    """Run a scipy correlation, mapping the undefined cases (constant input, N < 2) to 0."""
    # An untrained regression head often predicts a constant; the correlation is undefined, not an error.
    if len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        # Near-constant early-training outputs make scipy warn at every evaluation; the value is still usable.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = fn(predictions, labels)
    return _finite(result.statistic)  # type: ignore[attr-defined]


def _finite(value: float) -> float:
    """Plain float, with NaN (e.g. from NaN model outputs) reported as 0."""
    value = float(value)
    return value if np.isfinite(value) else 0.0


METRICS: dict[str, _Metric] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "macro_f1": _macro_f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": _spearman,
    "mse": _mse,
}


# ---- extractive question answering: the official SQuAD v2 definitions ------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, the articles a/an/the and extra whitespace (in the official order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_match(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def token_f1(gold: str, prediction: str) -> float:
    """F1 over the normalised tokens; when either side is empty (no answer), 1 if both are, else 0."""
    gold_tokens, pred_tokens = answer_tokens(gold), answer_tokens(prediction)
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v2_metrics(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """exact and f1 overall, over the answerable questions (HasAns_) and the others (NoAns_), with counts.

    As evaluate-v2.0.py: gold answers that normalise to nothing are dropped, a question left without any is
    scored against [""] (no answer); a question's score is its best over the gold answers; a question is
    answerable when its answer list is not empty. `answers` maps every question id to its gold texts, and every
    question needs a prediction ("" = no answer).
    """
    missing = [qid for qid in answers if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    if not answers:
        raise ValueError("cannot score an empty set of questions")
    exact, f1 = {}, {}
    for qid, texts in answers.items():
        gold = [t for t in texts if normalize_answer(t)] or [""]
        exact[qid] = max(exact_match(g, predictions[qid]) for g in gold)
        f1[qid] = max(token_f1(g, predictions[qid]) for g in gold)
    out = _averages(exact, f1, list(answers))
    for prefix, has_answer in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, texts in answers.items() if bool(texts) == has_answer]
        if qids:  # the official script leaves a group out when it has no question
            out.update({f"{prefix}_{k}": v for k, v in _averages(exact, f1, qids).items()})
    return out


def _averages(exact: dict, f1: dict, qids: list[str]) -> dict[str, float]:
    return {"exact": float(np.mean([exact[q] for q in qids])), "f1": float(np.mean([f1[q] for q in qids])),
            "total": len(qids)}


# ---- summarisation: ROUGE as the rouge-score package computes it ------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? (and any closing quotes or brackets) before whitespace and a capital, a digit or an
# opening quote. nltk's punkt model, the usual splitter, is a download that cannot happen here; a fixed rule also
# scores the same on every machine.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")
# Words whose period does not end a sentence ("Mr. Smith", "U.S. officials"); single letters (initials) neither.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "gen", "sen", "rep", "gov", "lt",
                            "col", "capt", "sgt", "rev", "vs", "no", "inc", "co", "corp", "ltd", "u.s", "u.k", "u.n",
                            "jan", "feb", "aug", "sept", "oct", "nov", "dec"})


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: every line break ends one (CNN/DailyMail highlights are one per line), and within
    a line `_SENTENCE_END` does, except after an abbreviation or an initial."""
    out = []
    for line in text.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            words = line[start:match.start()].split()
            word = words[-1].lower().strip("\"'\u201c\u2018([") if words else ""
            if match.group().startswith(".") and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
                continue
            out.append(line[start:match.end()].strip())
            start = match.end()
        out.append(line[start:].strip())
    return [s for s in out if s]


def rouge_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures x100 with Porter stemming (rouge-score), averaged over
    the examples. Lsum reads sentences from line breaks, so both sides are put one sentence per line first
    (`split_sentences`), the CNN/DailyMail convention; the other three do not depend on the split."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("cannot score an empty set of summaries")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(references) for name, total in totals.items()}
