"""Lookahead mode (DAW routing) and colorize+continue together, through real JACK ports."""

from __future__ import annotations

import time

import numpy as np
import pytest

from .conftest import running_service, sounding

pytestmark = pytest.mark.jack


def test_lookahead_delays_everything_by_exactly_s_and_colorizes(jack_server):
    S = 0.3
    with running_service("lookahead", velocity={"lookahead_s": S}) as (svc, player, listener):
        sent = []
        for i in range(24):
            p = 50 + (i * 5) % 30
            sent.append((time.monotonic(), p))
            player.send((0x90, p, 64))
            time.sleep(0.04)
            player.send((0x80, p, 0))
            if i % 6 == 0:
                player.send((0xB0, 64, 127 if i % 12 == 0 else 0))
            time.sleep(0.02)
        assert listener.wait_for(lambda ms: sum(1 for m in ms if m[0] == 0x90) == 24, 3.0)
        ons = [(t, m) for t, m in listener.got if m[0] == 0x90]
        delays = np.array([t - s for (t, _), (s, _) in zip(ons, sent)])
        assert [m[1] for _, m in ons] == [p for _, p in sent]
        # Exactly S later: scheduled on the loop clock; what is left is the JACK hop and the
        # poller, a few milliseconds on a busy machine.
        assert np.all(delays > S - 0.002) and np.median(delays) < S + 0.02, delays
        vels = [m[2] for _, m in ons]
        assert len(set(vels)) >= 4 and all(1 <= v <= 127 for v in vels)
        snap = svc.stop()
        assert snap["counters"].get("deadline_miss", 0) <= 2
        assert sounding(listener.messages()) == {}


def test_colorize_and_continue_together(jack_server):
    answer = {"silence_ms": 400, "length_mode": "seconds", "response_seconds": 2.0, "seed": 3}
    with running_service("both", phrase=answer, velocity={"deadline_ms": 20.0}) as (svc, player, listener):
        for p in (60, 62, 64, 65, 67, 69, 71, 72):
            player.send((0x90, p, 64))
            time.sleep(0.07)
            player.send((0x80, p, 0))
            time.sleep(0.02)
        t_end = time.monotonic()
        call = [m for t, m in listener.got if t <= t_end + 0.05 and m[0] == 0x90]
        assert len(call) == 8 and len({m[2] for m in call}) > 1  # the call itself was colorized
        assert listener.wait_for(lambda ms: any(t > t_end + 0.3 and m[0] & 0xF0 == 0x90 for t, m in listener.got), 5.0)
        assert listener.wait_for(lambda ms: (0xB0, 27, 0) in [tuple(m) for m in ms[-3:]], 8.0)
        svc.stop()
        assert sounding(listener.messages()) == {}
