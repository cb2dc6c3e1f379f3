"""Shared fixtures: small synthetic data sets and free ports for real gloo ranks."""
from __future__ import annotations

import socket

import pytest

from app.sources.synthetic import SyntheticSpec, generate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 categorical (50 ids), 3 dense, tasks click/convert; learnable (best AUC ~0.8)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, SyntheticSpec(rows={"train": 4000, "test": 1000}, cardinalities=[50] * 4,
                                num_dense=3, row_group_size=512, files_per_split=2))
    return out
