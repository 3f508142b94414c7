"""Mislabel evidence from the FCN (seed 000, section IV-D): "if, after convolving at several scales, no
classifier was able to find the food, the label is very likely wrong".

Per image: the label's best votes over every cell of every scale (0: no member ever takes the label for its
argmax anywhere: the paper's case, reason ``label_not_found``), its mean member probability there, and the
best class other than the label (the suggestion) with its votes and probability. ``score`` (suggested minus
label probability at their best cells, in [-1, 1]) is the paper's ranking, kept as the blacklist's
``margin``; ``pipeline/crop/rank.py`` turns this evidence, with the out-of-fold probabilities and duplicate
conflicts, into the probability that the label is wrong that the blacklist is ranked by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.crop.select import BatchFindings, Findings


@dataclass(frozen=True)
class Judgment:
    votes: int  # the label's best votes over all scales
    label_score: float  # the label's mean member probability at its best cell
    suggested: int  # the best class other than the label
    suggested_votes: int
    suggested_score: float
    members: int

    @property
    def score(self) -> float:
        return self.suggested_score - self.label_score


def judge(findings: Findings, label: int) -> Judgment:
    other = findings.best_class(exclude=label)
    return Judgment(
        votes=int(findings.votes[label]), label_score=float(findings.score[label]), suggested=other,
        suggested_votes=int(findings.votes[other]), suggested_score=float(findings.score[other]),
        members=findings.members,
    )  # fmt: skip


def evidence(j: Judgment, label: str, suggested: str, label_scale: float, suggested_scale: float) -> str:
    """A line for annotators: how the label and the suggestion were found."""
    return (
        f"{label}: best {j.votes}/{j.members} votes, p={j.label_score:.2f} (scale {label_scale:.2f}); "
        f"{suggested}: {j.suggested_votes}/{j.members} votes, p={j.suggested_score:.2f} "
        f"(scale {suggested_scale:.2f})"
    )


@dataclass(frozen=True)
class BatchJudgment:
    """``Judgment`` of a batch of images, as (N,) tensors on the findings' device."""

    votes: torch.Tensor  # int64
    label_score: torch.Tensor  # float64
    suggested: torch.Tensor  # int64
    suggested_votes: torch.Tensor
    suggested_score: torch.Tensor
    members: int


def judge_batch(findings: BatchFindings, labels: torch.Tensor) -> BatchJudgment:
    """``judge`` of every image of a batch at once: image n's label is ``labels[n]``."""
    other = findings.best_class(exclude=labels)
    at = lambda t, c: t.gather(1, c.view(-1, 1))[:, 0]  # noqa: E731
    return BatchJudgment(
        votes=at(findings.votes, labels), label_score=at(findings.score, labels), suggested=other,
        suggested_votes=at(findings.votes, other), suggested_score=at(findings.score, other),
        members=findings.members,
    )  # fmt: skip
