"""Search source: for each class, queries to an image search API; each hit becomes a URL candidate."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pipeline.config import SourceConfig
from pipeline.crawl.providers import make_provider, search
from pipeline.sources import Candidate, encode_locator

log = logging.getLogger("cropclean")


def queries_for(cfg: SourceConfig, label: str) -> list[str]:
    base = label.replace("_", " ").strip()
    first = f"{base} {cfg.query_suffix}".strip()
    extra = [f"{q} {cfg.query_suffix}".strip() for q in cfg.synonyms.get(label, [])]
    return list(dict.fromkeys([first, *extra]))


class SearchStopped(RuntimeError):
    """The provider stopped part-way (quota, auth, an answer of the wrong shape): the candidates so far
    are kept, the search resumes from its cache on the next run."""


def read(cfg: SourceConfig, name: str, cache_dir: str) -> Iterator[Candidate]:
    provider = make_provider(cfg.provider)
    seen: set[str] = set()
    for label in cfg.classes:
        queries = queries_for(cfg, label)
        found = 0
        for query in queries:
            want = cfg.per_class - found
            if want <= 0:
                break
            hits, error = search(provider, query, want, cache_dir)
            for hit in hits:
                if hit.url in seen:
                    continue
                seen.add(hit.url)
                found += 1
                # A refused hit (an image URL that is not http(s)) keeps its reason: the normalize stage
                # writes it as a rejected row and opens nothing.
                yield Candidate(name, hit.url, encode_locator(hit.url), label, None, url=hit.url,
                                page_url=hit.page_url, query=hit.query, engine=hit.engine, rank=hit.rank,
                                license=hit.license, reason=hit.reason, detail=hit.detail)  # fmt: skip
            if error:  # stop this provider; what it found so far stays
                raise SearchStopped(error)
