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
    # fetching over HTTP (plus http_<code> for 4xx answers, see http_reason)
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    DNS_ERROR = "dns_error"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    BLOCKED_PRIVATE_ADDRESS = "blocked_private_address"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    BAD_URL = "bad_url"  # malformed URL (port, host, brackets, encoding): final, never retried
    UNSUPPORTED_URL = "unsupported_url"  # a locator that is neither http(s) nor a path allowed to be read
    INTERNAL_ERROR = "internal_error"  # an unexpected exception for one input (a defect): final, see detail
    ROBOTS_OPTOUT = "robots_optout"
    # names that would become paths (pipeline/names.py)
    BAD_LABEL = "bad_label"
    BAD_SPLIT = "bad_split"
    BAD_IMAGE_ID = "bad_image_id"  # an image id that cannot name a file: a manifest edited by hand
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
    # annotators' verdicts (OUT/manifests/overrides.parquet)
    ANNOTATOR_DROP = "annotator_drop"  # an annotator's verdict took the image out of the dataset
    # crop and blacklist
    TOO_SMALL_FOR_SCALES = "too_small_for_scales"  # the short side needs more zoom than crop.max_scale
    LABEL_NOT_FOUND = "label_not_found"  # no member finds the label at any scale
    CROSS_LABEL_DUPLICATE = "cross_label_duplicate"  # a copy of the image carries another label
    LIKELY_MISLABELED = "likely_mislabeled"  # the ranking puts it among the wrong labels, found or not
    BLACKLISTED = "blacklisted"  # left out of the cropped dataset: see blacklist.parquet


# Failures worth another attempt in a later run (up to fetch.max_attempts); every other outcome is final.
RETRYABLE: frozenset[str] = frozenset(
    {
        Reason.TIMEOUT,
        Reason.CONNECTION_ERROR,
        Reason.DNS_ERROR,
        Reason.HTTP_429,
        Reason.HTTP_5XX,
        Reason.READ_ERROR,
    }
)


def http_reason(status: int) -> str:
    """Reason code for an HTTP error status: http_404, http_410, ..., http_429, and http_5xx for all 5xx."""
    if status >= 500:
        return Reason.HTTP_5XX.value
    return f"http_{status}"
