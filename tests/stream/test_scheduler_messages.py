import asyncio

import pytest

from cadenza.messages import Kind, classify
from cadenza.stream.scheduler import OutputScheduler


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"\x90\x3c\x40", Kind.NOTE_ON),
        (b"\x90\x3c\x00", Kind.NOTE_OFF),
        (b"\xb0\x40\x7f", Kind.CONTROL),
        (b"\xc0\x05", Kind.PROGRAM),
        (b"\xe0\x00\x40", Kind.PITCH_BEND),
        (b"\xf0\x7e\x01\xf7", Kind.SYSEX),
        (b"\xf8", Kind.CLOCK),
        (b"\xfa", Kind.TRANSPORT),
        (b"\xf2\x10\x00", Kind.COMMON),
        (b"\x90\x3c", None),
        (b"\x3c\x40", None),
        (b"\x90\x80\x40", None),
        (b"\xf0\x01\x02", None),
        (b"\xf4", None),
        (b"", None),
    ],
)
def test_classify(data, kind):
    assert classify(data) is kind


def test_classify_refuses_oversized_sysex():
    assert classify(b"\xf0" + b"\x01" * 5000 + b"\xf7", sysex_max=4096) is None


def test_scheduler_orders_cancels_and_emits_on_time():
    async def main():
        loop = asyncio.get_running_loop()
        out = []
        sched = OutputScheduler(loop, lambda due, data, tag: out.append((loop.time() - due, data, tag)))
        now = loop.time()
        sched.schedule(now + 0.03, b"c", "x")
        sched.schedule(now + 0.01, b"a", "x")
        sched.schedule(now + 0.02, b"b", "y")
        sched.schedule(now - 1.0, b"now", None)
        await asyncio.sleep(0.015)
        assert sched.cancel("x") == [b"c"]
        await asyncio.sleep(0.03)
        return out

    out = asyncio.run(main())
    assert [d for _, d, _ in out] == [b"now", b"a", b"b"]
    assert all(lateness < 0.05 for lateness, d, _ in out[1:])
