"""Stages: plain classes with `__call__(batch) -> batch`. They never import ray."""
