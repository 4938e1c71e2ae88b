"""Puts the project's root on sys.path, so that `pytest tests/test_train.py` alone finds its
modules, and generates the tiny toy corpus once for every test file that reads one."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (needs the path above)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The folder of the tiny toy corpus, seed 0 (a manifest per pool, text.jsonl, wavs/, tokenizer.json)."""
    d = str(tmp_path_factory.mktemp("data"))
    data.make_toy_data(d, seed=0, preset="tiny")
    return d
