"""Retrieval metrics: recall@k with shared captions and pessimistic ties, and its chance level."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _key_ids(
    query_keys: Sequence[str], gallery_keys: Sequence[str], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Integer ids for the keys, so that positives are one tensor comparison."""
    ids: dict[str, int] = {}
    query_ids = [ids.setdefault(key, len(ids)) for key in query_keys]
    gallery_ids = [ids.setdefault(key, len(ids)) for key in gallery_keys]
    return torch.tensor(query_ids, device=device), torch.tensor(gallery_ids, device=device)


def _query_ranks(
    similarity: Tensor, query_ids: Tensor, gallery_ids: Tensor, query_keys: Sequence[str]
) -> Tensor:
    """Per query, the number of negatives scoring at least as high as its best positive."""
    if similarity.isnan().any():
        # NaN compares false, so a NaN score would silently count as a hit or a miss.
        raise ValueError("similarity has NaN scores")
    positive = query_ids[:, None] == gallery_ids[None, :]
    missing = (~positive.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        names = ", ".join(repr(query_keys[i]) for i in missing[:5])
        raise ValueError(f"{len(missing)} queries have no positive in the gallery, e.g. {names}")
    best_positive = similarity.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)
    return ((similarity >= best_positive) & ~positive).sum(dim=1)


def _recall_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    return {k: (ranks < k).float().mean().item() for k in ks}


def recall_at_k(
    similarity: Tensor,
    query_keys: Sequence[str],
    gallery_keys: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Fraction of queries whose best positive ranks in the top k of the gallery, for each k.

    `similarity` is [queries, gallery]. Every gallery item with the query's key is a positive
    (several samples can share one caption). Ties count against the query: its rank is the
    number of negatives scoring at least its best positive, and it is a hit when rank < k.
    """
    if similarity.shape != (len(query_keys), len(gallery_keys)):
        raise ValueError(f"similarity {list(similarity.shape)} != [{len(query_keys)}, {len(gallery_keys)}]")
    query_ids, gallery_ids = _key_ids(query_keys, gallery_keys, similarity.device)
    return _recall_from_ranks(_query_ranks(similarity, query_ids, gallery_ids, query_keys), ks)


def chance_recall_at_k(
    query_keys: Sequence[str], gallery_keys: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Exact expected recall@k of a uniformly random gallery ranking.

    With P positives among N items, the top k misses them all with probability C(N-P, k) / C(N, k).
    """
    gallery_size = len(gallery_keys)
    positives_per_key = Counter(gallery_keys)
    queries_per_positives = Counter(positives_per_key[key] for key in query_keys)
    if 0 in queries_per_positives:
        missing = [key for key in query_keys if key not in positives_per_key][:5]
        raise ValueError(f"queries have no positive in the gallery, e.g. {missing}")
    recalls = {}
    for k in ks:
        # Exact integers: math.comb(N, k) does not overflow, and the ratio is at most 1.
        hits = sum(
            count * (1 - math.comb(gallery_size - positives, k) / math.comb(gallery_size, k))
            if k < gallery_size
            else count
            for positives, count in queries_per_positives.items()
        )
        recalls[k] = hits / len(query_keys)
    return recalls


def _chunked_ranks(
    queries: Tensor,
    gallery: Tensor,
    query_keys: Sequence[str],
    gallery_keys: Sequence[str],
    chunk_rows: int,
) -> Tensor:
    """`_query_ranks` of queries @ gallery.T, a block of rows at a time."""
    query_ids, gallery_ids = _key_ids(query_keys, gallery_keys, queries.device)
    blocks = []
    for start in range(0, queries.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        blocks.append(_query_ranks(queries[rows] @ gallery.T, query_ids[rows], gallery_ids, query_keys[rows]))
    return torch.cat(blocks)


@torch.no_grad()
def retrieval_metrics(
    media_emb: Tensor,
    text_emb: Tensor,
    texts: Sequence[str],
    dims: Sequence[int],
    media: str = "image",
    ks: Sequence[int] = (1, 5, 10),
    chunk_rows: int = 4096,
) -> dict[str, float]:
    """Recall@k both ways between row-paired media and text embeddings, at each Matryoshka dim.

    Captions are the keys, and each distinct caption is one text: samples that share a caption
    text collapse to a single entry of the text gallery (media->text) and a single text query
    (text->media), since identical texts are indistinguishable to any text encoder. A media
    query is right on its own caption; a text query on every media item with that caption.
    Keys are "{media}_to_text/R@{k}/dim{d}", "text_to_{media}/R@{k}/dim{d}" and the chance
    levels "{media}_to_text/chance@{k}", "text_to_{media}/chance@{k}", as fractions, computed
    with the same definition. Similarities are computed `chunk_rows` queries at a time.
    """
    count = len(texts)
    if media_emb.dim() != 2 or media_emb.shape[0] != count or text_emb.shape[0] != count:
        raise ValueError(
            f"need [N, D] embeddings for N={count} texts, "
            f"got {list(media_emb.shape)} and {list(text_emb.shape)}"
        )
    width = min(media_emb.shape[1], text_emb.shape[1])
    if not dims or not all(0 < d <= width for d in dims):
        raise ValueError(f"Matryoshka dims must be in 1..{width}, got {list(dims)}")
    first = {text: row for row, text in reversed(list(enumerate(texts)))}
    unique_texts = list(dict.fromkeys(texts))
    unique_emb = text_emb[torch.tensor([first[text] for text in unique_texts], device=text_emb.device)]
    directions = {
        f"{media}_to_text": (media_emb, texts, unique_emb, unique_texts),
        f"text_to_{media}": (unique_emb, unique_texts, media_emb, texts),
    }
    metrics: dict[str, float] = {}
    for d in dims:
        for name, (queries, query_keys, gallery, gallery_keys) in directions.items():
            # Float32 so that low-precision embeddings do not invent ties.
            queries_d = F.normalize(queries[:, :d].float(), dim=-1)
            gallery_d = F.normalize(gallery[:, :d].float(), dim=-1)
            ranks = _chunked_ranks(queries_d, gallery_d, query_keys, gallery_keys, chunk_rows)
            for k, recall in _recall_from_ranks(ranks, ks).items():
                metrics[f"{name}/R@{k}/dim{d}"] = recall
    for name, (_, query_keys, _, gallery_keys) in directions.items():
        for k, recall in chance_recall_at_k(query_keys, gallery_keys, ks).items():
            metrics[f"{name}/chance@{k}"] = recall
    return metrics
