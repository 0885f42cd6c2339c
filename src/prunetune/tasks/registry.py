"""Every task by name: the task classes that run it (one per kind of model) and the preset data they take.

Adding a task: its module (a Task subclass with its options dataclass) and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunetune.tasks.base import Task
from prunetune.tasks.classify import ClassifyTask, RegressionTask
from prunetune.tasks.glue import TASKS as GLUE
from prunetune.tasks.instruct import InstructTask
from prunetune.tasks.qa import SQUAD_V2, QATask
from prunetune.tasks.summarize import CausalSummarizeTask, Seq2SeqSummarizeTask
from prunetune.tasks.text2text import Text2TextTask


@dataclass(frozen=True)
class Entry:
    """A registered task: its forms, the first of which whose `families` has a model's family runs it on that
    model (a classifier on BERT, text-to-text on T5), and the preset they are built with (None: the user's data)."""

    forms: tuple[type[Task], ...]
    preset: Any = None
    description: str = ""  # `prunetune tasks`; default: the first form's

    def __post_init__(self) -> None:
        # one options class per task: its flags are known before the model (and so the form) is
        if len({form.options_class for form in self.forms}) != 1:
            raise TypeError(f"the forms of a task must share one options class: {self.forms}")


CLASSIFY = (ClassifyTask, Text2TextTask)

REGISTRY: dict[str, Entry] = {
    **{name: Entry((RegressionTask,) if spec.is_regression else CLASSIFY, spec, f"GLUE {spec.glue_name}")
       for name, spec in GLUE.items()},
    "classify": Entry(CLASSIFY),
    "regression": Entry((RegressionTask,)),
    "instruct": Entry((InstructTask,)),
    "alpaca": Entry((InstructTask,), description="instruction tuning (as instruct), Alpaca-style records"),
    "squad_v2": Entry((QATask,), SQUAD_V2, "SQuAD 2.0 extractive QA (rajpurkar/squad_v2 on the hub, or --data)"),
    "qa": Entry((QATask,)),
    "summarize": Entry((Seq2SeqSummarizeTask, CausalSummarizeTask)),
}
