"""Puts the project's root on sys.path, so that `pytest tests/test_train.py` alone finds its modules."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
