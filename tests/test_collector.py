"""collector.paused: the cyclic collector is off inside, on again after, with the block's cycles freed."""

import gc
import weakref

from fxprune.core.collector import paused


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_paused_turns_the_collector_off_and_frees_the_blocks_cycles_at_its_end():
    assert gc.isenabled()
    with paused():
        assert not gc.isenabled()
        with paused():  # nested: the outer block decides
            assert not gc.isenabled()
        assert not gc.isenabled()
        cycle = weakref.ref(_Cycle())
        assert cycle() is not None  # no collection inside
    assert gc.isenabled()
    assert cycle() is None


def test_paused_keeps_a_collector_the_user_turned_off():
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_paused_restores_the_collector_when_the_block_raises():
    try:
        with paused():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()
