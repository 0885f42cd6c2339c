"""GLUE metrics computed from model outputs with scikit-learn and scipy."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from prunetune.data import TaskSpec

_Metric = Callable[[np.ndarray, np.ndarray], float]


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score predictions (logits, class ids or regression scores) with the task's metrics plus "main"."""
    labels = np.asarray(labels)
    outputs = _scores(predictions) if task.is_regression else _class_ids(predictions)
    labels = labels.reshape(-1).astype(np.float64 if task.is_regression else np.int64)
    if len(outputs) != len(labels):
        raise ValueError(f"got {len(outputs)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot score an empty set of predictions")
    results = {name: _METRICS[name](outputs, labels) for name in task.metrics if name != "combined"}
    if "combined" in task.metrics:
        # GLUE's score for tasks with two metrics (MRPC, QQP, STS-B) is their average.
        results["combined"] = float(np.mean(list(results.values())))
    results["main"] = results[task.main_metric]
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


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation; sklearn already returns 0 when a model predicts a single class."""
    return _finite(matthews_corrcoef(labels, predictions))


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation, 0 when undefined."""
    return _correlation(stats.pearsonr, predictions, labels)


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation, 0 when undefined."""
    return _correlation(stats.spearmanr, predictions, labels)


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


_METRICS: dict[str, _Metric] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": _spearman,
}
