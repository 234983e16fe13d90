"""Answer metrics: the exact-match normalisation, BLEU on short answers, ROUGE-L."""

from __future__ import annotations

import pytest

from streamtrain.qa_metrics import answer_metrics, bleu, exact_match, normalize_answer, rouge_l


def test_normalisation_ignores_case_punctuation_articles_and_spacing() -> None:
    assert normalize_answer("  The   Seven. ") == "seven"
    assert normalize_answer("an odd one!") == "odd one"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match_counts_normalised_equality() -> None:
    assert exact_match(["Seven.", "odd", "two"], ["seven", "even", "two"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions for"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no answers"):
        exact_match([], [])


def test_bleu_scores_one_word_answers_on_unigrams() -> None:
    # Without effective order, a corpus of one-word answers scores 0 however many are right.
    assert bleu(["seven", "odd", "two", "even"], ["seven", "odd", "three", "odd"]) == pytest.approx(50.0)
    assert bleu(["a red cat sat here"], ["a red cat sat here"]) == pytest.approx(100.0)
    assert bleu(["nine"], ["seven"]) == 0.0


def test_rouge_l_is_the_mean_f_measure() -> None:
    assert rouge_l(["seven", "seven eight"], ["seven", "seven"]) == pytest.approx((1.0 + 2 / 3) / 2)
    assert set(answer_metrics(["x"], ["x"])) == {"exact_match", "bleu", "rouge_l"}
