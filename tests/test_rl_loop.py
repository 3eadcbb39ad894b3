"""The async RL recipe's own checks. Learning, bounded staleness and rollouts whose version was live on
the generator are checked on the run the RL notebook makes (tests/test_notebooks.py)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import require
from tests.procs.launch import launch

pytestmark = pytest.mark.slow


def test_unknown_generator_fails_before_starting_anything():
    require("hf")
    with pytest.raises(AssertionError, match="unknown generator 'nope'"):
        launch([sys.executable, "recipes/grpo_loop.py", "--generator", "nope"], timeout=60)
