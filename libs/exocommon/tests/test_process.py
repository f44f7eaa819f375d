"""Tests for exocommon.process."""

from __future__ import annotations

import gc

from exocommon.process import GC_THRESHOLD_ALLOCATIONS, tune_garbage_collector


def test_tune_garbage_collector_freezes_what_exists_and_collects_less_often():
    thresholds = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold()[0] == GC_THRESHOLD_ALLOCATIONS
        assert gc.get_freeze_count() > 0  # modules and the rest of the setup are out of the collector's sight
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
