"""Performer controls, as data: CC number -> what it does (config ``[controls]``).

Each action takes the engine, the session of the source that sent the CC, and the CC value
(0-127), and acts on that session only: a panic or mode switch on one remote session leaves the
others (and the ports) playing. A control whose CC is None is off, and a phrase or vary control
does nothing while that stage is not running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cadenza.config.settings import Settings
from cadenza.stream.velocity_stage import MODES

if TYPE_CHECKING:
    from cadenza.stream.engine import Engine
    from cadenza.stream.session import Session

Action = Callable[["Engine", "Session", int], None]


def control_map(settings: Settings) -> dict[int, Action]:
    """The engine's control table from the settings."""
    c = settings.controls
    table: dict[int | None, Action] = {
        c.strength_cc: lambda e, s, v: setattr(s.velocity, "strength", v / 127.0),
        c.mode_cc: lambda e, s, v: e.set_mode(MODES[min(2, v * 3 // 128)], source=s.source),
        c.bypass_cc: lambda e, s, v: setattr(s.velocity, "bypass", v >= 64),
        c.panic_cc: lambda e, s, v: e.panic("panic CC", source=s.source) if v >= 64 else None,
        c.temperature_cc: lambda e, s, v: s.phrase and s.phrase.set_temperature(0.2 + 1.6 * v / 127.0),
        c.length_cc: lambda e, s, v: s.phrase and s.phrase.set_length(1.0 + 15.0 * v / 127.0),
        c.phrase_cc: lambda e, s, v: s.phrase and s.phrase.set_enabled(v >= 64),
        c.vary_amount_cc: lambda e, s, v: s.vary and s.vary.set_amount(2.0 * v / 127.0),
        c.vary_mode_cc: lambda e, s, v: s.vary and s.vary.set_mode("morph" if v >= 64 else "vary"),
        c.density_cc: lambda e, s, v: s.vary and s.vary.set_attribute("density", _bipolar(v)),
        c.register_cc: lambda e, s, v: s.vary and s.vary.set_attribute("register", _bipolar(v)),
        c.interval_cc: lambda e, s, v: s.vary and s.vary.set_attribute("interval", _bipolar(v)),
        c.syncopation_cc: lambda e, s, v: s.vary and s.vary.set_attribute("syncopation", _bipolar(v)),
    }
    return {cc: fn for cc, fn in table.items() if cc is not None}


def _bipolar(value: int) -> float:
    """CC value -> attribute amount: 64 is 0 (as played), 0 is -2, 127 is +2."""
    return (value - 64) / 63.0 * 2.0 if value >= 64 else (value - 64) / 64.0 * 2.0
