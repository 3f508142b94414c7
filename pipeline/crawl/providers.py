"""Image search providers behind one interface: Brave Search, Google Custom Search, SerpApi.

Keys come from the environment and are sent only where each API documents them; they never reach a
manifest, a log line or an error message (errors are rebuilt from the response, never from the URL,
which for Google and SerpApi carries the key, and any key an answer echoes is blanked). A request that
carries a key never follows a redirect: the key would go wherever the answer points. Each endpoint can
be overridden by an environment variable, for proxies and for tests. Responses are cached under the
run's output, so a re-run spends no quota.

Answers are untrusted: one of the wrong shape is a ProviderError naming the provider and the place
(``brave: unexpected answer: results[3] is not an object``), and a result whose image URL is not an
absolute http(s) URL is refused on its own (a hit with a reason), never opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urljoin, urlsplit

import requests

from pipeline import storage
from pipeline.reasons import Reason

log = logging.getLogger("cropclean")

MAX_ANSWER_BYTES = 16 * 2**20  # a page of results is a few hundred KB; more is not a search answer
MAX_KEY_CHARS = 2000  # a hit's URL as a source key: longer is refused and cut (keeping a digest)
MAX_QUOTE_CHARS = 300  # text from an answer quoted in an error message

# (image URL, page URL, license hint) of one result as served. The image URL is checked per hit (a bad
# one refuses that hit only, see image_url_problem), so here it may be any JSON value.
Row = tuple[Any, str | None, str | None]


class ProviderError(RuntimeError):
    """A provider cannot serve this run (no key, bad key, quota spent, an answer of the wrong shape, a
    redirect); the message names the fix."""


class UnexpectedAnswer(ValueError):
    """An answer (or a cached page) without the documented shape; the message says where."""


@dataclass(frozen=True)
class SearchHit:
    url: str  # the image; for a refused hit, its value as text (see as_key)
    page_url: str | None  # the page it was found on
    rank: int  # 1-based position in the engine's results for this query
    engine: str
    query: str
    license: str | None = None
    reason: str | None = None  # refused: a Reason code, and nothing is fetched for it
    detail: str | None = None


def as_key(value: Any) -> str:
    """``value`` as a source key: valid UTF-8 text of at most MAX_KEY_CHARS characters (a longer one is
    cut and keeps a digest of the whole, so that two long values stay two keys)."""
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # unpaired surrogates: escaped
    if len(text) <= MAX_KEY_CHARS:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{text[: MAX_KEY_CHARS - 20]}...#{digest}"


def image_url_problem(value: Any) -> tuple[str, str] | None:
    """(reason, detail) when a result's image URL must not be fetched, else None.

    Only absolute ``http(s)://`` URLs go on, to the guarded fetcher. Anything else (``file:``, ``data:``,
    an fsspec chain such as ``simplecache::https://...``, a relative path, a value that is not text)
    would reach fsspec as a path to open, so it is refused here."""
    if not isinstance(value, str):
        return Reason.UNSUPPORTED_URL, f"the image URL is {_json_type(value)}, not text"
    if not value[:6].lower().startswith(("http:", "https:")):
        scheme = value.split(":", 1)[0] if ":" in value else ""
        shown = f"scheme {as_key(scheme)[:20]!r}" if scheme and "/" not in scheme else "relative or malformed"
        return Reason.UNSUPPORTED_URL, f"not an http(s) URL ({shown})"
    if len(value) > MAX_KEY_CHARS:
        return Reason.BAD_URL, f"a URL of {len(value)} characters"
    try:
        value.encode("utf-8")
        host = urlsplit(value).hostname
    except (UnicodeEncodeError, ValueError):
        return Reason.BAD_URL, "a URL that cannot be parsed"
    if not host:
        return Reason.BAD_URL, "an http(s) URL without a host"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def quote(text: str) -> str:
    """Text from an answer, safe to quote in a one-line message: printable, single-spaced, short."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_QUOTE_CHARS else text[: MAX_QUOTE_CHARS - 3] + "..."


def _list(node: Any, where: str) -> list[Any]:
    """A list in an answer; absent or null is an empty list."""
    if node is None:
        return []
    if not isinstance(node, list):
        raise UnexpectedAnswer(f"{where} is {_json_type(node)}, not a list")
    return node


def _object(node: Any, where: str) -> dict[str, Any]:
    """An object in an answer; absent or null is an empty object."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise UnexpectedAnswer(f"{where} is {_json_type(node)}, not an object")
    return node


def _text(node: Any, where: str) -> str | None:
    """Optional text in an answer (a page URL, a license link); empty is absent. It is stored, never
    opened, so only its type matters (and that it is valid UTF-8 once stored)."""
    if node is None:
        return None
    if not isinstance(node, str):
        raise UnexpectedAnswer(f"{where} is {_json_type(node)}, not a string")
    return as_key(node) or None


def _results(body: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    """The result objects listed under ``key``, each with its place in the answer (``results[3]``)."""
    out = []
    for i, item in enumerate(_list(body.get(key), key)):
        if not isinstance(item, dict):
            raise UnexpectedAnswer(f"{key}[{i}] is {_json_type(item)}, not an object")
        out.append((f"{key}[{i}]", item))
    return out


def _absent(value: Any) -> bool:
    """A result without an image URL: nothing to fetch, nothing to record."""
    return value is None or value == ""


def _message(body: Any, *path: str) -> str:
    node = body
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return quote(str(node)) if node else ""


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
    def _hits(self, body: dict[str, Any]) -> list[Row]:
        """(image url, page url, license hint) for each result of one response; UnexpectedAnswer when
        the response does not have the documented shape."""

    @abstractmethod
    def _error(self, status: int, body: Any) -> str | None:
        """A fatal error's message (auth, quota), or None when the response is usable."""

    def _redact(self, text: str) -> str:
        """``text`` with every key blanked: an answer may echo what it was sent."""
        for value in self._keys.values():
            if len(value) >= 4:
                text = text.replace(value, "[redacted]")
        return text

    def _fail(self, message: str) -> ProviderError:
        return ProviderError(self._redact(f"{self.name}: {message}"))

    def fetch_page(self, query: str, page: int) -> list[Row]:
        params, headers = self._request(query, page)
        try:
            # No redirects: the key (Brave's header, Google's and SerpApi's query parameter) would be sent
            # on to wherever the answer points, another host included.
            with self.session.get(self.endpoint, params=params, headers=headers, timeout=self.timeout,
                                  allow_redirects=False, stream=True) as resp:  # fmt: skip
                status = resp.status_code
                if 300 <= status < 400:
                    raise self._redirected(status, resp.headers.get("Location"))
                raw = self._read(resp)
        except requests.RequestException as exc:
            raise ProviderError(f"{self.name}: request failed ({type(exc).__name__})") from None
        body, shape = None, "an empty body"
        if raw.strip():
            try:
                body = json.loads(raw)
                shape = f"{_json_type(body)}, not an object"
            except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
                shape = "not JSON"
        problem = self._error(status, body)
        if problem:
            raise self._fail(problem)
        if status != 200 or not isinstance(body, dict):
            shown = "" if isinstance(body, dict) else f", {shape}"
            raise self._fail(f"unexpected answer (HTTP {status}{shown})")
        try:
            return self._hits(body)
        except UnexpectedAnswer as exc:
            raise self._fail(f"unexpected answer: {exc}") from None

    def _read(self, resp: requests.Response) -> bytes:
        """The body, refused past MAX_ANSWER_BYTES (after decompression) instead of held in memory."""
        chunks, size = [], 0
        for chunk in resp.iter_content(chunk_size=65536):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise self._fail(f"unexpected answer (larger than {MAX_ANSWER_BYTES // 2**20} MiB)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _redirected(self, status: int, location: str | None) -> ProviderError:
        try:
            parts = urlsplit(urljoin(self.endpoint, location)) if location else None
            host = parts and parts.hostname and f"{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        except ValueError:  # a malformed Location (bad port, brackets)
            host = None
        target = f"to {quote(host)[:100]}" if host else "with no usable Location"
        return self._fail(
            f"the endpoint redirected (HTTP {status} {target}); a request carrying the API key never "
            f"follows a redirect: set {self.endpoint_env} to the address that answers"
        )


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

    def _hits(self, body: dict[str, Any]) -> list[Row]:
        if "results" not in body and body.get("error"):
            raise UnexpectedAnswer(f"error: {_message(body, 'error', 'detail') or _message(body, 'error')}")
        out: list[Row] = []
        for where, r in _results(body, "results"):
            image = _object(r.get("properties"), f"{where}.properties").get("url")
            if not _absent(image):
                out.append((image, _text(r.get("url"), f"{where}.url"), None))
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

    def _hits(self, body: dict[str, Any]) -> list[Row]:
        # Google leaves "items" out of a page without results; an "error" instead is no such page.
        if "items" not in body and body.get("error"):
            raise UnexpectedAnswer(f"error: {_message(body, 'error', 'message') or _message(body, 'error')}")
        out: list[Row] = []
        for where, r in _results(body, "items"):
            if not _absent(r.get("link")):
                image = _object(r.get("image"), f"{where}.image")
                out.append((r["link"], _text(image.get("contextLink"), f"{where}.image.contextLink"), None))
        return out

    def _error(self, status: int, body: Any) -> str | None:
        if status == 200:
            return None
        error = body.get("error") if isinstance(body, dict) else None
        errors = error.get("errors") if isinstance(error, dict) else None
        items = errors if isinstance(errors, list) else []
        reasons = {e["reason"] for e in items if isinstance(e, dict) and isinstance(e.get("reason"), str)}
        message = _message(body, "error", "message") or (quote(error) if isinstance(error, str) else "")
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

    def _hits(self, body: dict[str, Any]) -> list[Row]:
        out: list[Row] = []
        for where, r in _results(body, "images_results"):
            if not _absent(r.get("original")):
                page_url = _text(r.get("link"), f"{where}.link")
                out.append((r["original"], page_url, _text(r.get("license_details_url"), f"{where}.license")))
        return out

    def _error(self, status: int, body: Any) -> str | None:
        message = _message(body, "error")
        if status == 401 or "invalid api key" in message.lower():
            return f"authentication failed (HTTP {status}): check SERPAPI_KEY. {message}".strip()
        if status == 429 or "run out of searches" in message.lower():
            return f"quota exceeded (HTTP {status}). {message}".strip()
        if message and "hasn't returned any results" in message.lower():
            return None  # an empty result set, not a failure
        if message and isinstance(body, dict) and "images_results" not in body:
            return f"error (HTTP {status}). {message}"  # an error where the results should be
        return f"error (HTTP {status}). {message}".strip() if status >= 400 else None


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (Brave, Google, SerpApi)}


def make_provider(name: str, env: dict[str, str] | None = None) -> Provider:
    if name not in PROVIDERS:
        raise ProviderError(f"unknown provider {name!r}; allowed: {', '.join(PROVIDERS)}")
    return PROVIDERS[name](env)


def _cache_uri(cache_dir: str, engine: str, query: str, page: int) -> str:
    digest = hashlib.sha256(json.dumps([engine, query, page]).encode()).hexdigest()[:24]
    return storage.join(cache_dir, engine, f"{digest}.json")


def cached_rows(text: str) -> list[Row]:
    """A cached page read back: a list of ``[image url, page url or null, license or null]``. The cache
    sits under the run's output and may have been edited: it passes the same checks as an answer."""
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError):
        raise UnexpectedAnswer("not JSON") from None
    out: list[Row] = []
    for i, row in enumerate(_list(rows, "page")):
        if not isinstance(row, list) or len(row) != 3:
            raise UnexpectedAnswer(f"row {i} is not [image url, page url, license]")
        out.append((row[0], _text(row[1], f"row {i} page url"), _text(row[2], f"row {i} license")))
    return out


def make_hit(row: Row, rank: int, engine: str, query: str) -> SearchHit:
    """One result as a hit; one whose image URL must not be fetched is refused (reason and detail)."""
    url, page_url, lic = row
    problem = image_url_problem(url)
    if problem is None:
        return SearchHit(url, page_url, rank, engine, query, lic)
    reason, detail = problem
    return SearchHit(as_key(url), page_url, rank, engine, query, lic, reason=reason, detail=detail)


def search(provider: Provider, query: str, want: int, cache_dir: str) -> tuple[list[SearchHit], str | None]:
    """Up to ``want`` distinct image hits for ``query``, paging as needed; pages come from the cache
    when a previous run fetched them. Returns the hits and, if the provider stopped part-way (quota,
    auth, an answer of the wrong shape), its error: the hits of the pages before it are kept."""
    hits: list[SearchHit] = []
    seen: set[str] = set()
    page = 0
    limit = provider.max_results
    while len(hits) < want and (limit is None or page * provider.page_size < limit):
        uri = _cache_uri(cache_dir, provider.name, query, page)
        rows: list[Row] | None = None
        if storage.exists(uri):
            try:
                rows = cached_rows(storage.read_text(uri))
            except (UnexpectedAnswer, UnicodeDecodeError) as exc:
                log.warning("%s: cached page %s is unusable (%s); asking the provider again", provider.name,
                            uri, exc)  # fmt: skip
        if rows is None:
            try:
                rows = provider.fetch_page(query, page)
            except ProviderError as exc:
                return hits[:want], str(exc)
            storage.write_text_atomic(uri, json.dumps(rows))
        new = 0
        for i, row in enumerate(rows):
            hit = make_hit(row, page * provider.page_size + i + 1, provider.name, query)
            if hit.url not in seen:
                seen.add(hit.url)
                hits.append(hit)
                new += 1
        if len(rows) < provider.page_size or not new:  # the last page, or one that ignores paging
            break
        page += 1
    return hits[:want], None
