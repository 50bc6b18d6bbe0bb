"""`cadenza serve`: real ports around the engine, signals, port supervision, a summary on exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

from cadenza.config.settings import Settings
from cadenza.models.runtime import pick_device
from cadenza.stream.build import build_engine
from cadenza.stream.engine import Engine
from cadenza.stream.ports import MidiInputPort, MidiOutputPort, api_name, resolve_api
from cadenza.stream.prometheus import prometheus_exporter
from cadenza.stream.spin import SpinEventLoop

log = logging.getLogger(__name__)


class PortSupervisor:
    """Watches attached ports; on loss releases notes, and reattaches when the port is back."""

    def __init__(self, engine: Engine, inp: MidiInputPort, out: MidiOutputPort, interval: float) -> None:
        self.engine, self.inp, self.out, self.interval = engine, inp, out, interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> None:
        inp, out, eng = self.inp, self.out, self.engine
        if inp.attach:
            if inp.connected and not inp.present():
                log.warning("input port %r vanished: releasing its notes", inp.name)
                inp.close()
                eng.metrics.inc("port_lost")
                eng.panic("input port lost", source=0)
            elif not inp.connected and inp.reopen():
                log.info("input port %r is back", inp.name)
        if out.attach:
            if out.connected and not out.present():
                log.warning("output port %r vanished: its notes will be released when it returns", out.name)
                out.close()
                eng.metrics.inc("port_lost")
            elif not out.connected and out.reopen():
                log.info("output port %r is back: releasing the notes it had", out.name)
                eng.panic("output port back", source=0)


async def serve(settings: Settings, *, mode: str, audio: bool = False, ready=None, install_signals: bool = True) -> dict:
    """Run the live service until SIGINT/SIGTERM (or ``engine.stop()``); return the final metrics.

    Whatever was opened is closed again on every way out, failed starts included.
    """
    loop = asyncio.get_running_loop()
    api = resolve_api(settings.midi.api)
    async with contextlib.AsyncExitStack() as opened:
        out = MidiOutputPort(api, client_name=settings.midi.client_name, name=settings.midi.out_port, attach=settings.midi.attach_out)
        opened.callback(out.close)
        engine = await opened.enter_async_context(build_engine(settings, mode, [out], loop=loop))
        spinning = isinstance(loop, SpinEventLoop)  # busy polling: the loop reads the input itself
        inp = MidiInputPort(
            api,
            client_name=settings.midi.client_name,
            name=settings.midi.in_port,
            attach=settings.midi.attach_in,
            deliver=engine.deliver_now if spinning else engine.deliver,
            poll_on=loop if spinning else None,
        )
        opened.callback(inp.close)  # closed before the output
        audio_sink = None
        if audio:
            # Opened after the MIDI ports: on a JACK server in sync mode, a new JACK client
            # (rtmidi holds the GIL while it connects) waits for the audio client's cycle, whose
            # Python callback waits for the GIL — a 5 s stall and a refused client.
            from cadenza.stream.sinks.audio import AudioSink

            audio_sink = AudioSink(settings.audio)
            opened.callback(audio_sink.close)
            engine.sinks.add(audio_sink)
            log.info("audio: %s", format_audio_latency(audio_sink.latency_report()))
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, engine.stop)
                opened.callback(loop.remove_signal_handler, sig)
        device = pick_device(settings.velocity.device) if mode in ("colorize", "both", "lookahead") else "-"
        # Off unless metrics.prometheus_port is set; closed first on the way out, after the notes' release.
        opened.enter_context(prometheus_exporter(settings.metrics, engine.metrics, info={"mode": mode, "device": device, "role": "serve"}))
        log.info(
            "listening on %r -> %r (%s, mode %s, model on %s%s); Ctrl-C to stop",
            inp.name,
            out.name,
            api_name(api),
            mode,
            device,
            ", busy polling: one core at 100 %" if spinning else "",
        )
        if ready is not None:
            ready(engine)
        await engine.run(PortSupervisor(engine, inp, out, settings.midi.reattach_interval_s).run)
        snapshot = engine.metrics.snapshot()
        if audio_sink is not None:
            snapshot["audio"] = audio_sink.latency_report()
        return snapshot


def format_audio_latency(r: dict) -> str:
    """One line on the audio output: device, block, configured and measured latency."""
    measured = (
        "not measured yet"
        if r["measured_latency_ms_p50"] is None
        else f"measured p50 {r['measured_latency_ms_p50']:.1f} ms (max {r['measured_latency_ms_max']:.1f})"
    )
    return (
        f"{r['device']} ({r['host_api']}), {r['block_size']} frames at {r['sample_rate']} Hz = {r['block_ms']:.1f} ms blocks; "
        f"output latency configured {r['configured_latency_ms']:.1f} ms, {measured}; {r['underflows']} underflows"
    )


def print_summary(snapshot: dict, file=sys.stderr) -> None:
    c = snapshot["counters"]
    lat = snapshot["latency"]
    parts = [
        f"{c.get('in', 0)} messages in, {c.get('out', 0)} out, {c.get('note_on', 0)} notes",
        f"{c.get('deadline_miss', 0)} deadline misses",
        f"{c.get('dropped', 0)} dropped",
    ]
    for name in ("internal", "model", "loop_lag", "ttfn"):
        s = lat.get(name)
        if s and s.get("n"):
            parts.append(f"{name} p50 {s['p50_ms']:.2f} ms p99 {s['p99_ms']:.2f} ms")
    print("cadenza: summary: " + "; ".join(parts), file=file)
    if "audio" in snapshot:
        print("cadenza: audio: " + format_audio_latency(snapshot["audio"]), file=file)
    logging.getLogger(__name__).debug("final metrics %s", json.dumps(snapshot))
