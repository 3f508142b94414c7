"""Loopback test servers: a hostile image host and fake image-search APIs."""

from tests.servers.hostile import ImageServer, LoopbackServer, image_bytes, make_image
from tests.servers.providers import (
    BraveImageSearchServer,
    GoogleCSEServer,
    RecordedRequest,
    SerpApiServer,
    page_url,
)

__all__ = [
    "BraveImageSearchServer",
    "GoogleCSEServer",
    "ImageServer",
    "LoopbackServer",
    "RecordedRequest",
    "SerpApiServer",
    "image_bytes",
    "make_image",
    "page_url",
]
