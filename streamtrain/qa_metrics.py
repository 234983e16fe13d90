"""Answer-quality metrics of generated answers against references: exact match, BLEU, ROUGE-L.

Exact match compares answers after SQuAD's normalisation (``normalize_answer``): lower case,
punctuation removed, the articles a/an/the removed, whitespace collapsed — so "Seven." and
"seven" match, "seven" and "eight" do not.
"""

from __future__ import annotations

import re
import string

from sacrebleu.metrics import BLEU

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after ``normalize_answer``."""
    _check(predictions, references)
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with effective order.

    Effective order leaves out n-gram orders that no hypothesis is long enough to have, so a set
    of one-word answers is scored on unigrams instead of being 0 whatever the answers are.
    """
    _check(predictions, references)
    return float(BLEU(effective_order=True).corpus_score(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, 0-1) over the answers."""
    _check(predictions, references)
    from rouge_score import rouge_scorer  # pulls in nltk, scikit-learn and pandas: seconds

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def answer_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``exact_match``, ``bleu`` and ``rouge_l`` of the answers."""
    return {
        "exact_match": exact_match(predictions, references),
        "bleu": bleu(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no answers to score")
