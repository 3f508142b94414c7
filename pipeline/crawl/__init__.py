"""Collecting images from the web: search providers, a guarded HTTP fetcher, and their config."""
