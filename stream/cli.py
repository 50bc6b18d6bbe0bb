"""`cadenza ports` and `cadenza serve`."""

from __future__ import annotations

import asyncio

import rtmidi

from cadenza.cli import add_override
from cadenza.errors import PortError
from cadenza.stream import ports


def register(groups) -> None:
    root = groups["root"]
    p = root.add_parser("ports", help="list MIDI ports per backend")
    p.set_defaults(func=_ports)

    s = root.add_parser("serve", help="run the live service between MIDI ports")
    s.add_argument(
        "--mode",
        choices=["colorize", "continue", "both", "lookahead", "vary"],
        default="colorize",
        help="colorize velocities, answer phrases, both, delay for a DAW, or vary a played loop (default: colorize)",
    )
    s.add_argument(
        "--in",
        dest="in_port",
        metavar="NAME",
        help="input port: a virtual port name, or with --attach-in an existing port (name or /regex/)",
    )
    s.add_argument("--out", dest="out_port", metavar="NAME", help="output port name (virtual, or existing with --attach-out)")
    s.add_argument("--attach-in", action="store_true", default=None, help="attach to an existing input port instead of creating one")
    s.add_argument("--attach-out", action="store_true", default=None, help="attach to an existing output port instead of creating one")
    s.add_argument("--midi-api", choices=["auto", "alsa", "jack", "coremidi", "winmm"], help="MIDI backend (default: auto)")
    s.add_argument("--velocity-mode", choices=["replace", "blend", "flat-only"], help="how model and player velocities combine")
    s.add_argument("--strength", type=float, help="blend strength 0-1")
    s.add_argument("--deadline-ms", type=float, help="per-note model deadline")
    s.add_argument("--lookahead", type=float, metavar="SECONDS", help="with --mode lookahead: delay output by exactly this much")
    s.add_argument("--vary-model", choices=["mel_2bar", "mel_16bar"], help="with --mode vary: the loop length (2 or 16 bars) and its model")
    s.add_argument("--vary-amount", type=float, metavar="X", help="with --mode vary: noise added to the loop's latent code (default 0.6)")
    s.add_argument(
        "--morph",
        action="store_const",
        const="morph",
        dest="vary_style",
        help="with --mode vary: morph from the previous loop to a new one instead of varying it",
    )
    s.add_argument("--audio", action="store_true", help="also play the output through FluidSynth")
    s.add_argument(
        "--busy-poll",
        action="store_true",
        default=None,
        help="the event loop never sleeps (engine.busy_poll): lowest latency, one core at 100 %%",
    )
    s.add_argument(
        "--transport",
        choices=["ports", "mqtt"],
        default="ports",
        help="ports: one performer on MIDI ports (default); mqtt: the headless daemon, sessions from `cadenza bridge` over an MQTT broker",
    )
    s.add_argument("--mqtt-host", metavar="HOST", help="MQTT broker host (mqtt.host)")
    s.add_argument("--mqtt-port", type=int, metavar="PORT", help="MQTT broker port (mqtt.port)")
    s.add_argument("--metrics-json", metavar="FILE", help="write the final metrics here on exit (used by `cadenza bench`)")
    s.set_defaults(func=_serve, prepare=_serve_overrides)

    b = root.add_parser("bridge", help="connect local MIDI ports to a session of a `serve --transport mqtt` daemon")
    b.add_argument("--session", required=True, metavar="NAME", help="session name (1-64 of A-Z a-z 0-9 _ . -), unique per performer")
    b.add_argument("--mqtt-host", metavar="HOST", help="MQTT broker host (mqtt.host)")
    b.add_argument("--mqtt-port", type=int, metavar="PORT", help="MQTT broker port (mqtt.port)")
    b.add_argument(
        "--in",
        dest="in_port",
        metavar="NAME",
        help="input port: a virtual port name, or with --attach-in an existing port (name or /regex/)",
    )
    b.add_argument("--out", dest="out_port", metavar="NAME", help="output port name (virtual, or existing with --attach-out)")
    b.add_argument("--attach-in", action="store_true", default=None, help="attach to an existing input port instead of creating one")
    b.add_argument("--attach-out", action="store_true", default=None, help="attach to an existing output port instead of creating one")
    b.add_argument("--midi-api", choices=["auto", "alsa", "jack", "coremidi", "winmm"], help="MIDI backend (default: auto)")
    b.set_defaults(func=_bridge, prepare=_bridge_overrides)


def _ports(args, settings) -> int:
    compiled = rtmidi.get_compiled_api()
    found = False
    for name in ("alsa", "jack", "coremidi", "winmm"):
        api = ports._API[name]
        if api not in compiled:
            continue
        try:
            ports.resolve_api(name)
        except PortError as exc:
            print(f"{name}: unavailable ({exc})")
            continue
        ins, outs = ports.list_ports(api)
        found = True
        print(f"{name}:")
        print("  inputs (Cadenza can read):  " + (", ".join(repr(p) for p in ins) or "none"))
        print("  outputs (Cadenza can write): " + (", ".join(repr(p) for p in outs) or "none"))
    if not found:
        print(f"no MIDI backend is available; {ports.JACK_HINT}")
        return 1
    return 0


def _mqtt_overrides(args) -> None:
    add_override(args, "mqtt", "host", args.mqtt_host)
    add_override(args, "mqtt", "port", args.mqtt_port)


def _bridge_overrides(args) -> None:
    for key, value in (
        ("in_port", args.in_port),
        ("out_port", args.out_port),
        ("attach_in", args.attach_in),
        ("attach_out", args.attach_out),
        ("api", args.midi_api),
    ):
        add_override(args, "midi", key, value)
    _mqtt_overrides(args)


def _bridge(args, settings) -> int:
    import sys

    from cadenza.stream.mqtt.bridge import run_bridge

    counts = asyncio.run(run_bridge(settings, args.session))
    print("cadenza: bridge summary: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()), file=sys.stderr)
    return 0


def _serve_overrides(args) -> None:
    _mqtt_overrides(args)
    for key, value in (
        ("in_port", args.in_port),
        ("out_port", args.out_port),
        ("attach_in", args.attach_in),
        ("attach_out", args.attach_out),
        ("api", args.midi_api),
    ):
        add_override(args, "midi", key, value)
    add_override(args, "engine", "busy_poll", args.busy_poll)
    add_override(args, "velocity", "mode", args.velocity_mode)
    add_override(args, "velocity", "strength", args.strength)
    add_override(args, "velocity", "deadline_ms", args.deadline_ms)
    add_override(args, "velocity", "lookahead_s", args.lookahead)
    add_override(args, "vary", "model", args.vary_model)
    add_override(args, "vary", "amount", args.vary_amount)
    add_override(args, "vary", "mode", args.vary_style)


def _serve(args, settings) -> int:
    from cadenza.stream.serve import print_summary, serve
    from cadenza.stream.spin import spin_runner

    if args.transport == "mqtt":
        from cadenza.errors import ConfigError
        from cadenza.stream.mqtt.daemon import serve_mqtt

        if args.audio:
            raise ConfigError("--audio plays one performer's output; with --transport mqtt each bridge plays its own")
        main = serve_mqtt(settings, mode=args.mode)
    else:
        main = serve(settings, mode=args.mode, audio=args.audio)
    with spin_runner() if settings.engine.busy_poll else asyncio.Runner() as runner:
        snapshot = runner.run(main)
    print_summary(snapshot)
    if args.metrics_json:
        import json

        from cadenza.atomic import atomic_path

        with atomic_path(args.metrics_json) as tmp:
            tmp.write_text(json.dumps(snapshot))
    return 0
