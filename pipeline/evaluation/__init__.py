"""Evaluation of a run: the paper's Table IV (a classifier outside the ensemble on original and cropped test
images) and the quality of the blacklist. Everything lands in the ``evaluation`` section of
``OUT/metrics.json`` (the evaluate stage returns the section, keeping the keys other parts wrote there;
the runner writes it).
``duplicates`` scores a dedupe against the true duplicate pairs of generated data (tests, bench/).

Importing the package is light (no torch, no Ray): the training side lives in
``pipeline/stages/evaluate.py``.
"""

from __future__ import annotations

from pipeline.evaluation.classify import format_evaluation, read_evaluation_metrics

__all__ = ["format_evaluation", "read_evaluation_metrics"]
