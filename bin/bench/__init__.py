"""`cadenza bench ...`: the live path measured, as figures and JSON; one module per bench.

=============  =============================================================  ===============
latency        added latency through real JACK ports, next to a loopback      ``latency.py``
throughput     highest note rate with < 1 % deadline misses (in process)      ``throughput.py``
window         the piano-roll window's cost for the first note after a pause  ``window.py``
mqtt           the headless daemon's round trip through a broker              ``mqtt.py``
continue       time to first note (``engine_ttfn``, from the phrase bench)    ``ttfn.py``
device         every GPU path (CPU paths without a GPU)                        ``device.py``
=============  =============================================================  ===============
"""

from __future__ import annotations


def register(groups) -> None:
    from cadenza.bench import latency, mqtt, piano, throughput, window

    b = groups["bench"]
    for module in (latency, throughput, window, mqtt, piano):
        module.register(b)


def engine_ttfn(model, settings, *, calls: int = 50) -> dict:
    """See :func:`cadenza.bench.ttfn.engine_ttfn` (kept here: `cadenza bench continue` imports it)."""
    from cadenza.bench.ttfn import engine_ttfn as run

    return run(model, settings, calls=calls)
