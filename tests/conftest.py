"""Shared fixtures: tiny models exported once per test session and reused by every test file."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_models import tiny_model  # noqa: F401  (tests import it from here too)

HAS_EXPORT = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "onnx"))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly on machines without a CUDA device."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(encoder, decoder) -> (model, export_dir), each pair exported once per session."""
    cache: dict[tuple, tuple] = {}

    def get(encoder: str = "vit", decoder: str = "gpt2", **kwargs):
        key = (encoder, decoder, tuple(sorted(kwargs.items())))
        if key not in cache:
            from vedrt.export import export_model

            model = tiny_model(encoder, decoder, **kwargs)
            out = tmp_path_factory.mktemp(f"export-{encoder}-{decoder}") / "export"
            report = export_model(model, out)
            cache[key] = (model, out, report)
        return cache[key][:2]

    get.reports = cache
    return get
