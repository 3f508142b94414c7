"""Reason codes: the one place that names why an image was rejected, failed or set aside."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    REJECTED = "rejected"  # the input is readable but not wanted (bad content, duplicate, policy)
    FAILED = "failed"  # the input could not be obtained (missing, I/O error, network)


class Reason(StrEnum):
    # reading
    MISSING_FILE = "missing_file"
    READ_ERROR = "read_error"
    EMPTY_FILE = "empty_file"
    TOO_LARGE = "too_large"
    NEEDS_CRAWL = "needs_crawl"  # an http(s) URL in a list read without the crawler
    # decoding and validation
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    DECODE_ERROR = "decode_error"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    # dedupe
    DUPLICATE_EXACT = "duplicate_exact"
    DUPLICATE_NEAR = "duplicate_near"
    DUPLICATE_OF_TEST = "duplicate_of_test"
    # balance
    CLASS_CAP = "class_cap"
    CLASS_TOO_SMALL = "class_too_small"
    UNLABELED = "unlabeled"
