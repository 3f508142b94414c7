"""Image search providers behind one interface: Brave Search, Google Custom Search, SerpApi.

Keys come from the environment and are sent only where each API documents them; they never reach a
manifest, a log line or an error message (errors are rebuilt from the response, never from the URL,
which for Google and SerpApi carries the key). Each endpoint can be overridden by an environment
variable, for proxies and for tests. Responses are cached under the run's output, so a re-run spends
no quota.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import requests

from pipeline import storage


class ProviderError(RuntimeError):
    """A provider cannot serve this run (no key, bad key, quota spent); the message names the fix."""


@dataclass(frozen=True)
class SearchHit:
    url: str  # the image
    page_url: str | None  # the page it was found on
    rank: int  # 1-based position in the engine's results for this query
    engine: str
    query: str
    license: str | None = None


class Provider(ABC):
    name: ClassVar[str]
    endpoint_env: ClassVar[str]
    default_endpoint: ClassVar[str]
    key_envs: ClassVar[tuple[str, ...]]
    page_size: ClassVar[int]
    max_results: ClassVar[int | None] = None  # the most results the API serves for one query

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 20.0) -> None:
        env = dict(os.environ if env is None else env)
        missing = [k for k in self.key_envs if not env.get(k)]
        if missing:
            raise ProviderError(f"{self.name}: set {' and '.join(missing)} in the environment")
        self._keys = {k: env[k] for k in self.key_envs}
        self.endpoint = env.get(self.endpoint_env) or self.default_endpoint
        self.timeout = timeout
        self.session = requests.Session()

    @abstractmethod
    def _request(self, query: str, page: int) -> tuple[dict[str, Any], dict[str, str]]:
        """Query parameters and headers for one page (0-based)."""

    @abstractmethod
    def _hits(self, body: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
        """(image url, page url, license hint) for each result of one response."""

    @abstractmethod
    def _error(self, status: int, body: Any) -> str | None:
        """A fatal error's message (auth, quota), or None when the response is usable."""

    def fetch_page(self, query: str, page: int) -> list[tuple[str, str | None, str | None]]:
        params, headers = self._request(query, page)
        try:
            resp = self.session.get(self.endpoint, params=params, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ProviderError(f"{self.name}: request failed ({type(exc).__name__})") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        problem = self._error(resp.status_code, body)
        if problem:
            raise ProviderError(f"{self.name}: {problem}")
        if resp.status_code != 200 or not isinstance(body, dict):
            raise ProviderError(f"{self.name}: unexpected answer (HTTP {resp.status_code})")
        return self._hits(body)


def _message(body: Any, *path: str) -> str:
    node = body
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return str(node) if node else ""


class Brave(Provider):
    name = "brave"
    endpoint_env = "CROPCLEAN_BRAVE_ENDPOINT"
    default_endpoint = "https://api.search.brave.com/res/v1/images/search"
    key_envs = ("BRAVE_API_KEY",)
    page_size = 200
    max_results = 2000  # offset is a page index, 0..9

    def _request(self, query: str, page: int) -> tuple[dict[str, Any], dict[str, str]]:
        params = {"q": query, "count": self.page_size, "offset": page, "safesearch": "strict"}
        return params, {"X-Subscription-Token": self._keys["BRAVE_API_KEY"], "Accept": "application/json"}

    def _hits(self, body: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
        out = []
        for r in body.get("results") or []:
            url = (r.get("properties") or {}).get("url")
            if url:
                out.append((url, r.get("url"), None))
        return out

    def _error(self, status: int, body: Any) -> str | None:
        detail = _message(body, "error", "detail") or _message(body, "error", "code")
        if status in (401, 403) or (status == 422 and "token" in detail.lower()):
            return f"authentication failed (HTTP {status}): check BRAVE_API_KEY. {detail}".strip()
        if status == 429:
            return f"quota or rate limit exceeded (HTTP 429). {detail}".strip()
        return None


class Google(Provider):
    name = "google"
    endpoint_env = "CROPCLEAN_GOOGLE_ENDPOINT"
    default_endpoint = "https://www.googleapis.com/customsearch/v1"
    key_envs = ("GOOGLE_CSE_KEY", "GOOGLE_CSE_CX")
    page_size = 10
    max_results = 100

    def _request(self, query: str, page: int) -> tuple[dict[str, Any], dict[str, str]]:
        keys = self._keys
        params = {
            "key": keys["GOOGLE_CSE_KEY"], "cx": keys["GOOGLE_CSE_CX"], "q": query, "searchType": "image",
            "num": self.page_size, "start": page * self.page_size + 1,
        }  # fmt: skip
        return params, {"Accept": "application/json"}

    def _hits(self, body: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
        items = body.get("items") or []
        return [(r["link"], (r.get("image") or {}).get("contextLink"), None) for r in items if r.get("link")]

    def _error(self, status: int, body: Any) -> str | None:
        if status == 200:
            return None
        errors = body.get("error", {}).get("errors", []) if isinstance(body, dict) else []
        reasons = {e.get("reason") for e in errors if isinstance(e, dict)}
        message = _message(body, "error", "message")
        auth = {"keyInvalid", "forbidden", "accessNotConfigured"}
        if (status in (400, 401, 403) and reasons & auth) or "API key not valid" in message:
            return f"authentication failed (HTTP {status}): check GOOGLE_CSE_KEY and GOOGLE_CSE_CX. {message}"
        if status == 429 or reasons & {"dailyLimitExceeded", "rateLimitExceeded", "userRateLimitExceeded"}:
            return f"quota exceeded (HTTP {status}). {message}".strip()
        return f"error (HTTP {status}). {message}".strip() if status >= 400 else None


class SerpApi(Provider):
    name = "serpapi"
    endpoint_env = "CROPCLEAN_SERPAPI_ENDPOINT"
    default_endpoint = "https://serpapi.com/search.json"
    key_envs = ("SERPAPI_KEY",)
    page_size = 100

    def _request(self, query: str, page: int) -> tuple[dict[str, Any], dict[str, str]]:
        params = {"engine": "google_images", "q": query, "ijn": page, "api_key": self._keys["SERPAPI_KEY"]}
        return params, {"Accept": "application/json"}

    def _hits(self, body: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
        results = body.get("images_results") or []
        return [
            (r["original"], r.get("link"), r.get("license_details_url")) for r in results if r.get("original")
        ]

    def _error(self, status: int, body: Any) -> str | None:
        message = _message(body, "error")
        if status == 401 or "invalid api key" in message.lower():
            return f"authentication failed (HTTP {status}): check SERPAPI_KEY. {message}".strip()
        if status == 429 or "run out of searches" in message.lower():
            return f"quota exceeded (HTTP {status}). {message}".strip()
        if message and "hasn't returned any results" in message.lower():
            return None  # an empty result set, not a failure
        return f"error (HTTP {status}). {message}".strip() if status >= 400 else None


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (Brave, Google, SerpApi)}


def make_provider(name: str, env: dict[str, str] | None = None) -> Provider:
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r}; allowed: {', '.join(PROVIDERS)}")
    return PROVIDERS[name](env)


def _cache_uri(cache_dir: str, engine: str, query: str, page: int) -> str:
    digest = hashlib.sha256(json.dumps([engine, query, page]).encode()).hexdigest()[:24]
    return storage.join(cache_dir, engine, f"{digest}.json")


def search(provider: Provider, query: str, want: int, cache_dir: str) -> tuple[list[SearchHit], str | None]:
    """Up to ``want`` distinct image hits for ``query``, paging as needed; pages come from the cache
    when a previous run fetched them. Returns the hits and, if the provider stopped part-way (quota,
    auth), its error: the hits of the pages before it are kept."""
    hits: list[SearchHit] = []
    seen: set[str] = set()
    page = 0
    limit = provider.max_results
    while len(hits) < want and (limit is None or page * provider.page_size < limit):
        uri = _cache_uri(cache_dir, provider.name, query, page)
        if storage.exists(uri):
            rows = [tuple(r) for r in json.loads(storage.read_text(uri))]
        else:
            try:
                rows = provider.fetch_page(query, page)
            except ProviderError as exc:
                return hits[:want], str(exc)
            storage.write_text_atomic(uri, json.dumps(rows))
        for i, (url, page_url, lic) in enumerate(rows):
            if url not in seen:
                seen.add(url)
                hits.append(
                    SearchHit(url, page_url, page * provider.page_size + i + 1, provider.name, query, lic)
                )
        if len(rows) < provider.page_size:
            break
        page += 1
    return hits[:want], None
