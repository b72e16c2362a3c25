"""Shared fixtures: tiny models exported once per test session and reused by every test file.

Importing this file needs neither torch nor transformers: CI's runtime-only stage collects every
test module in a virtual environment without them and runs the tests marked `runtime`. There, a
runtime test that skips is a failure: it would hide exactly the breakage that stage is for.
"""

from __future__ import annotations

import os

import pytest

RUNTIME_ONLY = os.environ.get("VEDRT_RUNTIME_ONLY") == "1"  # set by .ci/run's second stage


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "runtime: needs only the runtime (numpy, onnxruntime, pillow, tokenizers)"
    )


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if RUNTIME_ONLY and report.skipped and "runtime" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"runtime test skipped in the runtime-only stage: {report.longrepr}"


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(encoder, decoder) -> (model, export_dir), each pair exported once per session."""
    cache: dict[tuple, tuple] = {}

    def get(encoder: str = "vit", decoder: str = "gpt2", **kwargs):
        key = (encoder, decoder, tuple(sorted(kwargs.items())))
        if key not in cache:
            from tiny_models import tiny_model

            from vedrt.export import export_model

            model = tiny_model(encoder, decoder, **kwargs)
            out = tmp_path_factory.mktemp(f"export-{encoder}-{decoder}") / "export"
            report = export_model(model, out)
            cache[key] = (model, out, report)
        return cache[key][:2]

    get.reports = cache
    return get
