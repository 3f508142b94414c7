"""Loopback stand-ins for image-search APIs, speaking each service's documented JSON.

One server per provider: ``BraveImageSearchServer`` (Brave Search API, image search),
``GoogleCSEServer`` (Google Custom Search JSON API, ``searchType=image``) and ``SerpApiServer``
(SerpApi Google Images API). Each takes a mapping query -> image URLs, the valid key(s) and an
optional quota of successful calls, records every request in ``requests``, and exposes its full
endpoint URL (``endpoint`` and a provider-named alias) for the ``CROPCLEAN_*_ENDPOINT`` variables.
For hostile tests, ``redirect_to`` and ``answer_with`` replace the API's own answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlencode, urlsplit

from tests.servers.hostile import IMAGE_SIZE, LoopbackServer, RequestHandler, image_bytes

THUMB_SIZE = (160, 120)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the provider saw it."""

    method: str
    path: str
    params: dict[str, str]  # first value of each query parameter
    query: dict[str, list[str]]  # every value of each query parameter
    headers: dict[str, str]  # names lower-cased


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _stem(url: str) -> str:
    last = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or "index"
    return last.rsplit(".", 1)[0] or "index"


def page_url(image_url: str) -> str:
    """The source page reported for ``image_url``: ``/page/<stem>.html`` on the image's own host."""
    parts = urlsplit(image_url)
    return f"{parts.scheme}://{parts.netloc}/page/{_stem(image_url)}.html"


def _mime(url: str) -> str:
    path = urlsplit(url).path.lower()
    if path.endswith(".png"):
        return "image/png"
    if path.endswith(".gif"):
        return "image/gif"
    if path.endswith(".svg"):
        return "image/svg+xml"
    return "image/jpeg"


def _int_param(raw: str | None, default: int) -> int | None:
    """``default`` when absent, the integer when well-formed, else None."""
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return None


class _ProviderServer(LoopbackServer):
    endpoint_path: ClassVar[str]
    extra_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        results: Mapping[str, Sequence[str]],
        keys: str | Iterable[str],
        quota: int | None = None,
    ) -> None:
        super().__init__()
        self.results: dict[str, list[str]] = {q: list(urls) for q, urls in results.items()}
        self.keys: frozenset[str] = frozenset([keys] if isinstance(keys, str) else keys)
        self.quota = quota
        self.requests: list[RecordedRequest] = []
        self.successful_calls = 0
        self._lock = threading.Lock()
        # Hostile modes, for tests: every search request is answered with a redirect to ``redirect_to``
        # (the request's query string appended, as a proxy or an http->https hop would), or with a
        # canned answer (``answer_with``) instead of the API's own.
        self.redirect_to: str | None = None
        self.redirect_status = 302
        self._canned: tuple[int, bytes] | None = None

    def answer_with(self, payload: Any, status: int = 200) -> None:
        """Answer every search request with ``payload`` (JSON-encoded unless bytes) and ``status``."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self._canned = (status, body)

    @property
    def endpoint(self) -> str:
        """Full URL of the search endpoint."""
        return self.base_url + self.endpoint_path

    def search_requests(self) -> list[RecordedRequest]:
        """Recorded requests that hit the search endpoint."""
        paths = {self.endpoint_path, *self.extra_paths}
        with self._lock:
            return [r for r in self.requests if r.path in paths]

    def reset(self) -> None:
        """Forget recorded requests and give the whole quota back."""
        with self._lock:
            self.requests.clear()
            self.successful_calls = 0

    def _thumb_url(self, image_url: str) -> str:
        digest = hashlib.sha1(image_url.encode()).hexdigest()[:16]
        return f"{self.base_url}/thumbs/{digest}.jpg"

    def _take_quota(self) -> bool:
        """Count one successful call; False when the quota is already spent."""
        with self._lock:
            if self.quota is not None and self.successful_calls >= self.quota:
                return False
            self.successful_calls += 1
            return True

    @property
    def remaining(self) -> int | None:
        with self._lock:
            return None if self.quota is None else max(self.quota - self.successful_calls, 0)

    def _route(self, h: RequestHandler, head: bool) -> None:
        record = RecordedRequest(
            method=h.command,
            path=h.route_path,
            params={k: v[0] for k, v in h.query.items()},
            query={k: list(v) for k, v in h.query.items()},
            headers=h.header_dict(),
        )
        with self._lock:
            self.requests.append(record)
        if h.route_path in (self.endpoint_path, *self.extra_paths):
            if self.redirect_to is not None:
                query = urlsplit(h.path).query
                h.send_redirect(self.redirect_to + (f"?{query}" if query else ""), head, self.redirect_status)
            elif self._canned is not None:
                status, body = self._canned
                if not self._take_quota():  # the quota still counts, so that a runaway client ends
                    status, body = 429, json.dumps({"error": "Quota exceeded."}).encode()
                h.send_body(status, body, "application/json; charset=utf-8", head)
            else:
                self._search(h, head)
        elif h.route_path.startswith("/thumbs/"):
            h.send_body(200, image_bytes("thumb-" + _stem(h.route_path)), "image/jpeg", head)
        else:
            self._send_json(h, 404, {"error": "Not found"}, head)

    @staticmethod
    def _send_json(
        h: RequestHandler,
        status: int,
        payload: Any,
        head: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload, indent=2).encode()
        h.send_body(status, body, "application/json; charset=utf-8", head, headers)

    def _search(self, h: RequestHandler, head: bool) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- Brave


class BraveImageSearchServer(_ProviderServer):
    """Brave Search API image search: ``GET /res/v1/images/search`` with ``X-Subscription-Token``.

    ``count`` is 1..200 (default 50). The image-search reference lists no ``offset``; with
    ``honor_offset`` (default) it is read as Brave's web-search ``offset`` (0..9, in pages of
    ``count``), otherwise it is ignored as the documented endpoint would.
    """

    endpoint_path = "/res/v1/images/search"
    MAX_COUNT = 200
    DEFAULT_COUNT = 50
    MAX_OFFSET = 9

    def __init__(
        self,
        results: Mapping[str, Sequence[str]],
        keys: str | Iterable[str],
        quota: int | None = None,
        honor_offset: bool = True,
    ) -> None:
        super().__init__(results, keys, quota)
        self.honor_offset = honor_offset

    @property
    def brave_endpoint(self) -> str:
        return self.endpoint

    @staticmethod
    def _error(code: str, status: int, detail: str, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "ErrorResponse",
            "error": {
                "id": str(uuid.uuid4()),
                "status": status,
                "code": code,
                "detail": detail,
                "meta": meta,
            },
            "time": int(time.time()),
        }

    def _validation(
        self, h: RequestHandler, head: bool, loc: list[str], kind: str, msg: str, value: Any
    ) -> None:
        meta = {"errors": [{"type": kind, "loc": loc, "msg": msg, "input": value, "ctx": {}}]}
        body = self._error("VALIDATION", 422, "Unable to validate request parameter(s)", meta)
        self._send_json(h, 422, body, head)

    def _rate_headers(self) -> dict[str, str]:
        if self.quota is None:
            return {}
        left = self.remaining or 0
        return {
            "X-RateLimit-Limit": f"50, {self.quota}",
            "X-RateLimit-Policy": f"50;w=1, {self.quota};w=2592000",
            "X-RateLimit-Remaining": f"49, {left}",
            "X-RateLimit-Reset": "1, 2592000",
        }

    def _search(self, h: RequestHandler, head: bool) -> None:
        token = h.headers.get("X-Subscription-Token")
        if not token:
            self._validation(h, head, ["header", "x-subscription-token"], "missing", "Field required", None)
            return
        if token not in self.keys:
            body = self._error(
                "SUBSCRIPTION_TOKEN_INVALID",
                422,
                "The provided subscription token is invalid.",
                {"component": "authentication"},
            )
            self._send_json(h, 422, body, head)
            return
        q = h.param("q")
        if not q:
            self._validation(h, head, ["query", "q"], "missing", "Field required", None)
            return
        if len(q) > 400 or len(q.split()) > 50:
            self._validation(h, head, ["query", "q"], "string_too_long", "Query too long", q)
            return
        count = _int_param(h.param("count"), self.DEFAULT_COUNT)
        if count is None or not 1 <= count <= self.MAX_COUNT:
            msg = f"Input should be between 1 and {self.MAX_COUNT}"
            self._validation(h, head, ["query", "count"], "value_error", msg, h.param("count"))
            return
        offset = _int_param(h.param("offset"), 0) if self.honor_offset else 0
        if offset is None or not 0 <= offset <= self.MAX_OFFSET:
            msg = f"Input should be between 0 and {self.MAX_OFFSET}"
            self._validation(h, head, ["query", "offset"], "value_error", msg, h.param("offset"))
            return
        if not self._take_quota():
            body = self._error(
                "QUOTA_LIMITED", 429, "Request quota limit exceeded for plan.", {"component": "rate_limiter"}
            )
            self._send_json(h, 429, body, head, self._rate_headers())
            return
        start = offset * count
        urls = self.results.get(q, [])[start : start + count]
        payload = {
            "type": "images",
            "query": {"original": q, "spellcheck_off": False, "show_strict_warning": False},
            "results": [self._result(u) for u in urls],
            "extra": {"might_be_offensive": False},
        }
        self._send_json(h, 200, payload, head, self._rate_headers())

    def _result(self, image_url: str) -> dict[str, Any]:
        page = page_url(image_url)
        parts = urlsplit(page)
        thumb = self._thumb_url(image_url)
        return {
            "type": "image_result",
            "title": f"{_stem(image_url)} - {parts.hostname}",
            "url": page,
            "source": parts.netloc,
            "page_fetched": "2025-01-01T00:00:00Z",
            "thumbnail": {"src": thumb, "width": THUMB_SIZE[0], "height": THUMB_SIZE[1]},
            "properties": {
                "url": image_url,
                "placeholder": thumb,
                "width": IMAGE_SIZE[0],
                "height": IMAGE_SIZE[1],
            },
            "meta_url": {
                "scheme": parts.scheme,
                "netloc": parts.netloc,
                "hostname": parts.hostname,
                "favicon": f"{self.base_url}/thumbs/favicon.jpg",
                "path": parts.path,
            },
            "confidence": "high",
        }


# --------------------------------------------------------------------------- Google Custom Search


class GoogleCSEServer(_ProviderServer):
    """Google Custom Search JSON API: ``GET /customsearch/v1?key=&cx=&q=&searchType=image&num=&start=``.

    ``num`` is 1..10 (default 10), ``start`` is 1-based (default 1) and no result past the 100th
    is ever served: a request reaching beyond it is a 400. The key is read from the ``key`` query
    parameter only. With ``cx`` given, any other engine id is rejected.
    """

    endpoint_path = "/customsearch/v1"
    MAX_NUM = 10
    MAX_RESULTS = 100

    def __init__(
        self,
        results: Mapping[str, Sequence[str]],
        keys: str | Iterable[str],
        quota: int | None = None,
        cx: str | None = None,
    ) -> None:
        super().__init__(results, keys, quota)
        self.cx = cx

    @property
    def google_endpoint(self) -> str:
        return self.endpoint

    @staticmethod
    def _error(code: int, message: str, reason: str, status: str, **extra: Any) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status,
        }
        error.update(extra)
        return {"error": error}

    def _invalid_argument(self, h: RequestHandler, head: bool) -> None:
        body = self._error(400, "Request contains an invalid argument.", "badRequest", "INVALID_ARGUMENT")
        self._send_json(h, 400, body, head)

    def _search(self, h: RequestHandler, head: bool) -> None:
        key = h.param("key")
        if not key:
            msg = (
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API."
            )
            self._send_json(h, 403, self._error(403, msg, "forbidden", "PERMISSION_DENIED"), head)
            return
        if key not in self.keys:
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "customsearch.googleapis.com"},
                }
            ]
            msg = "API key not valid. Please pass a valid API key."
            body = self._error(400, msg, "badRequest", "INVALID_ARGUMENT", details=details)
            self._send_json(h, 400, body, head)
            return
        cx, q = h.param("cx"), h.param("q")
        num = _int_param(h.param("num"), self.MAX_NUM)
        start = _int_param(h.param("start"), 1)
        if (
            not cx
            or (self.cx is not None and cx != self.cx)
            or not q
            or num is None
            or start is None
            or not 1 <= num <= self.MAX_NUM
            or start < 1
            or start + num - 1 > self.MAX_RESULTS
        ):
            self._invalid_argument(h, head)
            return
        if not self._take_quota():
            msg = (
                "Quota exceeded for quota metric 'Queries' and limit 'Queries per day' of service "
                "'customsearch.googleapis.com' for consumer 'project_number:000000000000'."
            )
            self._send_json(h, 429, self._error(429, msg, "rateLimitExceeded", "RESOURCE_EXHAUSTED"), head)
            return
        image_search = h.param("searchType") == "image"
        everything = self.results.get(q, [])[: self.MAX_RESULTS]
        urls = everything[start - 1 : start - 1 + num]
        total = len(everything)

        def query_info(start_index: int, count: int) -> dict[str, Any]:
            info: dict[str, Any] = {
                "title": f"Google Custom Search - {q}",
                "totalResults": str(total),
                "searchTerms": q,
                "count": count,
                "startIndex": start_index,
                "inputEncoding": "utf8",
                "outputEncoding": "utf8",
                "safe": "off",
                "cx": cx,
            }
            if image_search:
                info["searchType"] = "image"
            return info

        queries: dict[str, Any] = {"request": [query_info(start, num)]}
        if start + num <= total:
            queries["nextPage"] = [query_info(start + num, num)]
        if start > 1:
            queries["previousPage"] = [query_info(max(start - num, 1), num)]
        payload: dict[str, Any] = {
            "kind": "customsearch#search",
            "url": {
                "type": "application/json",
                "template": self.endpoint + "?q={searchTerms}&num={count?}&start={startIndex?}"
                "&cx={cx?}&searchtype={searchType?}&alt=json",
            },
            "queries": queries,
            "context": {"title": "cropclean test engine"},
            "searchInformation": {
                "searchTime": 0.01,
                "formattedSearchTime": "0.01",
                "totalResults": str(total),
                "formattedTotalResults": f"{total:,}",
            },
        }
        # Google leaves "items" out entirely when a page has no results.
        if urls:
            payload["items"] = [self._item(u) if image_search else self._web_item(u) for u in urls]
        self._send_json(h, 200, payload, head)

    def _item(self, image_url: str) -> dict[str, Any]:
        title = f"{_stem(image_url)} - {urlsplit(image_url).hostname}"
        mime = _mime(image_url)
        return {
            "kind": "customsearch#result",
            "title": title,
            "htmlTitle": title,
            "link": image_url,
            "displayLink": _host(image_url),
            "snippet": title,
            "htmlSnippet": title,
            "mime": mime,
            "fileFormat": mime,
            "image": {
                "contextLink": page_url(image_url),
                "height": IMAGE_SIZE[1],
                "width": IMAGE_SIZE[0],
                "byteSize": len(image_bytes(_stem(image_url), "PNG" if mime == "image/png" else "JPEG")),
                "thumbnailLink": self._thumb_url(image_url),
                "thumbnailHeight": THUMB_SIZE[1],
                "thumbnailWidth": THUMB_SIZE[0],
            },
        }

    @staticmethod
    def _web_item(image_url: str) -> dict[str, Any]:
        # Without searchType=image the API answers with web pages, not image files.
        page = page_url(image_url)
        title = f"Page {_stem(image_url)}"
        return {
            "kind": "customsearch#result",
            "title": title,
            "htmlTitle": title,
            "link": page,
            "displayLink": _host(page),
            "snippet": title,
            "htmlSnippet": title,
            "formattedUrl": page,
            "htmlFormattedUrl": page,
        }


# --------------------------------------------------------------------------- SerpApi


class SerpApiServer(_ProviderServer):
    """SerpApi Google Images API: ``GET /search.json?engine=google_images&q=&api_key=&ijn=``.

    ``ijn`` is the 0-based page number; each page holds up to 100 images. A page past the end is
    a successful search whose body carries SerpApi's "no results" ``error`` string. Image URLs in
    ``license_details`` get that URL as their ``license_details_url``.
    """

    endpoint_path = "/search.json"
    extra_paths = ("/search",)
    PAGE_SIZE = 100
    INVALID_KEY = "Invalid API key. Your API key should be here: https://serpapi.com/manage-api-key"
    OUT_OF_SEARCHES = "Your account has run out of searches."
    NO_RESULTS = "Google hasn't returned any results for this query."

    def __init__(
        self,
        results: Mapping[str, Sequence[str]],
        keys: str | Iterable[str],
        quota: int | None = None,
        license_details: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(results, keys, quota)
        self.license_details = dict(license_details or {})

    @property
    def serpapi_endpoint(self) -> str:
        return self.endpoint

    def _search(self, h: RequestHandler, head: bool) -> None:
        api_key = h.param("api_key")
        if not api_key or api_key not in self.keys:
            self._send_json(h, 401, {"error": self.INVALID_KEY}, head)
            return
        engine = h.param("engine", "google")
        if engine != "google_images":
            self._send_json(h, 400, {"error": f"Unsupported `{engine}` search engine."}, head)
            return
        q = h.param("q")
        if not q:
            self._send_json(h, 400, {"error": "Missing query `q` parameter."}, head)
            return
        ijn = _int_param(h.param("ijn"), 0)
        if ijn is None or ijn < 0:
            self._send_json(h, 400, {"error": "Invalid `ijn` parameter."}, head)
            return
        if not self._take_quota():
            self._send_json(h, 429, {"error": self.OUT_OF_SEARCHES}, head)
            return
        everything = self.results.get(q, [])
        first = ijn * self.PAGE_SIZE
        urls = everything[first : first + self.PAGE_SIZE]
        search_id = uuid.uuid4().hex[:24]
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        payload: dict[str, Any] = {
            "search_metadata": {
                "id": search_id,
                "status": "Success",
                "json_endpoint": f"{self.base_url}/searches/{search_id}.json",
                "created_at": now,
                "processed_at": now,
                "google_images_url": "https://www.google.com/search?" + urlencode({"q": q, "udm": "2"}),
                "total_time_taken": 0.01,
            },
            "search_parameters": {
                "engine": "google_images",
                "q": q,
                "google_domain": "google.com",
                "ijn": str(ijn),
                "device": "desktop",
            },
        }
        if not urls:
            payload["search_information"] = {"image_results_state": "Fully empty"}
            payload["error"] = self.NO_RESULTS
            self._send_json(h, 200, payload, head)
            return
        payload["images_results"] = [self._result(u, first + i + 1) for i, u in enumerate(urls)]
        pagination: dict[str, Any] = {"current": ijn}
        base_params = {"engine": "google_images", "q": q}
        if first + self.PAGE_SIZE < len(everything):
            pagination["next"] = f"{self.endpoint}?{urlencode({**base_params, 'ijn': ijn + 1})}"
        if ijn > 0:
            pagination["previous"] = f"{self.endpoint}?{urlencode({**base_params, 'ijn': ijn - 1})}"
        payload["serpapi_pagination"] = pagination
        self._send_json(h, 200, payload, head)

    def _result(self, image_url: str, position: int) -> dict[str, Any]:
        host = urlsplit(image_url).hostname or ""
        result: dict[str, Any] = {
            "position": position,
            "thumbnail": self._thumb_url(image_url),
            "related_content_id": hashlib.sha1(image_url.encode()).hexdigest()[:20],
            "source": host,
            "source_logo": f"{self.base_url}/thumbs/logo.jpg",
            "title": f"{_stem(image_url)} - {host}",
            "link": page_url(image_url),
            "original": image_url,
            "original_width": IMAGE_SIZE[0],
            "original_height": IMAGE_SIZE[1],
            "is_product": False,
        }
        if image_url in self.license_details:
            result["license_details_url"] = self.license_details[image_url]
        return result
