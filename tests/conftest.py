"""Shared test set-up: seeds, the ``cuda`` marker, and the Triton interpreter on CPU-only machines."""

import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter. It is chosen when a
# kernel is decorated, so this must happen before any gsq_torch module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
