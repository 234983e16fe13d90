"""Retrieval metrics on hand-computed cases, and chance recall against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from streamtrain.metrics import chance_recall_at_k, recall_at_k, retrieval_metrics


def test_recall_of_a_permutation() -> None:
    # Query "a" ranks its positive first, "b" second (behind "a"), "c" last (behind "a" and "b"):
    # ranks 0, 1, 2, so R@1 = 1/3, R@2 = 2/3, R@3 = 3/3.
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.9, 0.8, 0.3]])
    assert recall_at_k(similarity, ["a", "b", "c"], ["a", "b", "c"], ks=(1, 2, 3)) == pytest.approx(
        {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    )


def test_every_item_with_the_query_caption_is_a_positive() -> None:
    gallery = ["dog", "dog", "cat", "bird"]
    similarity = torch.tensor(
        [
            # "dog": the second dog (0.9) beats everything -> rank 0, although the first dog is last.
            [0.1, 0.9, 0.5, 0.3],
            # "cat": two dogs (0.8, 0.7) beat the cat (0.6) -> rank 2.
            [0.8, 0.7, 0.6, 0.1],
            # "bird": only the cat (0.5) beats the bird (0.4); both dogs are below -> rank 1.
            [0.2, 0.3, 0.5, 0.4],
        ]
    )
    # Ranks 0, 2, 1: R@1 = 1/3, R@2 = 2/3, R@3 = 3/3.
    assert recall_at_k(similarity, ["dog", "cat", "bird"], gallery, ks=(1, 2, 3)) == pytest.approx(
        {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    )


def test_ties_with_negatives_count_against_the_query() -> None:
    # All three score 0.5: both negatives tie the positive -> rank 2, a hit only from k=3.
    flat = torch.tensor([[0.5, 0.5, 0.5]])
    assert recall_at_k(flat, ["a"], ["a", "b", "c"], ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    # A tie between two positives costs nothing: no negative reaches 0.5 -> rank 0.
    two_positives = torch.tensor([[0.5, 0.5, 0.2]])
    assert recall_at_k(two_positives, ["a"], ["a", "a", "b"], ks=(1,)) == {1: 1.0}


def test_query_without_positive_is_an_error() -> None:
    with pytest.raises(ValueError, match="'zebra'"):
        recall_at_k(torch.zeros(2, 2), ["a", "zebra"], ["a", "b"])
    with pytest.raises(ValueError, match="'zebra'"):
        chance_recall_at_k(["a", "zebra"], ["a", "b"])


def test_nan_scores_are_an_error() -> None:
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[math.nan, 0.0]]), ["a"], ["a", "b"])


def test_recall_matches_a_per_query_loop_on_random_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    gallery = [f"k{int(i)}" for i in torch.randint(0, 6, (40,), generator=generator)]
    queries = [gallery[int(i)] for i in torch.randint(0, 40, (30,), generator=generator)]
    similarity = torch.randint(0, 4, (30, 40), generator=generator).float()  # many ties
    expected = {k: 0.0 for k in (1, 3, 10)}
    for row, key in zip(similarity.tolist(), queries, strict=True):
        best = max(s for s, g in zip(row, gallery, strict=True) if g == key)
        rank = sum(s >= best for s, g in zip(row, gallery, strict=True) if g != key)
        for k in expected:
            expected[k] += (rank < k) / len(queries)
    assert recall_at_k(similarity, queries, gallery, ks=(1, 3, 10)) == pytest.approx(expected)


def test_chance_recall_formula_and_brute_force() -> None:
    # N=5 items, P=2 positives: 1 - C(3,k)/C(5,k) = 1 - 3/5 = 2/5 (k=1), 1 - 3/10 = 7/10 (k=2),
    # 1 - 1/10 = 9/10 (k=3); from k = N-P+1 = 4 a positive is always in the top k.
    gallery = ["a", "a", "b", "c", "d"]
    expected = {1: 2 / 5, 2: 7 / 10, 3: 9 / 10, 4: 1.0, 5: 1.0}
    assert chance_recall_at_k(["a"], gallery, ks=(1, 2, 3, 4, 5)) == pytest.approx(expected)
    # The same by averaging recall_at_k over all 5! orderings (distinct scores, so no ties).
    enumerated = {k: 0.0 for k in expected}
    orderings = list(itertools.permutations(range(5)))
    for scores in orderings:
        for k, recall in recall_at_k(torch.tensor([scores]).float(), ["a"], gallery, ks=expected).items():
            enumerated[k] += recall / len(orderings)
    assert enumerated == pytest.approx(expected)


def test_chance_recall_averages_queries_and_survives_large_galleries() -> None:
    # "a" has P=2 of N=5 (2/5 at k=1), "b" has P=1 (1/5): mean 3/10.
    assert chance_recall_at_k(["a", "b"], ["a", "a", "b", "c", "d"], ks=(1,)) == pytest.approx({1: 0.3})
    # One positive among N: k/N, with C(N, k) far beyond float range for k=500.
    keys = [str(i) for i in range(200_000)]
    assert chance_recall_at_k(keys[:3], keys, ks=(10, 500)) == pytest.approx(
        {10: 10 / 200_000, 500: 500 / 200_000}
    )


def test_retrieval_metrics_slices_each_dim() -> None:
    # On the first 2 features rows 0 and 2 are the same vector, as are rows 1 and 3; the last two
    # features tell them apart. Media and text embeddings are identical.
    emb = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, -1, 0], [0, 1, 0, -1]])
    texts = ["t0", "t1", "t2", "t3"]
    metrics = retrieval_metrics(emb, emb.clone(), texts, dims=(2, 4), media="audio", ks=(1, 2))
    # dim 4: each row's own caption scores 1, the others 0 or -1 -> rank 0.
    # dim 2: each row ties exactly one negative at 1 -> rank 1: R@1 = 0, R@2 = 1.
    # Chance with one positive among 4: k/4.
    expected = {}
    for direction in ("audio_to_text", "text_to_audio"):
        expected |= {
            f"{direction}/R@1/dim4": 1.0,
            f"{direction}/R@2/dim4": 1.0,
            f"{direction}/R@1/dim2": 0.0,
            f"{direction}/R@2/dim2": 1.0,
            f"{direction}/chance@1": 0.25,
            f"{direction}/chance@2": 0.5,
        }
    assert metrics == pytest.approx(expected)
    with pytest.raises(ValueError, match="dims"):
        retrieval_metrics(emb, emb, texts, dims=(8,))


def test_retrieval_metrics_directions_and_chunks() -> None:
    generator = torch.Generator().manual_seed(1)
    media = torch.randn(50, 8, generator=generator)
    caption_emb = torch.randn(20, 8, generator=generator)
    texts = [f"caption {i % 20}" for i in range(50)]  # shared captions: identical text embeddings
    text = caption_emb[[i % 20 for i in range(50)]]
    unique = [f"caption {i}" for i in range(20)]
    metrics = retrieval_metrics(media, text, texts, dims=(3, 8), ks=(1, 5))
    assert metrics == pytest.approx(
        retrieval_metrics(media, text, texts, dims=(3, 8), ks=(1, 5), chunk_rows=7)
    )
    for d in (3, 8):
        similarity = (
            torch.nn.functional.normalize(media[:, :d], dim=-1)
            @ torch.nn.functional.normalize(caption_emb[:, :d], dim=-1).T
        )
        forward = recall_at_k(similarity, texts, unique, ks=(1, 5))
        backward = recall_at_k(similarity.T, unique, texts, ks=(1, 5))
        assert forward != backward  # the directions differ on random data
        for k in (1, 5):
            assert metrics[f"image_to_text/R@{k}/dim{d}"] == pytest.approx(forward[k])
            assert metrics[f"text_to_image/R@{k}/dim{d}"] == pytest.approx(backward[k])


def test_shared_captions_are_one_text_each_way() -> None:
    # Three images captioned a, a, b; the two "a" texts embed identically.
    media = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    metrics = retrieval_metrics(media, text, ["a", "a", "b"], dims=(2,), ks=(1, 2))
    # image->text over the 2 distinct texts {a: e0, b: e1}:
    #   img0 (e0): a scores 1, b 0 -> hit@1.  img1 (e1): a 0, b 1 -> rank 1, miss@1.
    #   img2 (0.6, 0.8): a 0.6, b 0.8 -> its caption b first, hit@1.  R@1 = 2/3, R@2 = 1.
    #   Chance: one positive among 2 texts -> 1/2 at k=1, 1 at k=2.
    # text->image, queries a and b over the 3 images:
    #   a (e0): img0 1.0, img1 0, img2 0.6; positives img0, img1; best positive 1.0 -> hit@1.
    #   b (e1): img0 0, img1 1.0, img2 0.8; positive img2 (0.8) < img1 -> rank 1, miss@1.
    #   R@1 = 1/2, R@2 = 1.  Chance: a has 2 of 3 positives -> 2/3 at k=1; b 1 of 3 -> 1/3;
    #   mean 1/2; at k=2: a 1, b 1 - C(2,2)/C(3,2) = 2/3 -> mean 5/6.
    assert metrics == pytest.approx(
        {
            "image_to_text/R@1/dim2": 2 / 3,
            "image_to_text/R@2/dim2": 1.0,
            "image_to_text/chance@1": 0.5,
            "image_to_text/chance@2": 1.0,
            "text_to_image/R@1/dim2": 0.5,
            "text_to_image/R@2/dim2": 1.0,
            "text_to_image/chance@1": 0.5,
            "text_to_image/chance@2": 5 / 6,
        }
    )
