"""Cadenza's configuration: one typed, documented field per knob.

Sources, strongest first: CLI overrides (passed as keyword arguments), environment variables
(prefix ``CADENZA_``, nested with ``__``, e.g. ``CADENZA_VELOCITY__DEADLINE_MS=2``), a TOML file
(``--config FILE``), then the defaults below. ``cadenza config show`` prints the result as TOML,
which loads back unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from cadenza.errors import ConfigError

MidiApi = Literal["auto", "alsa", "jack", "coremidi", "winmm"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MidiSettings(_Section):
    api: MidiApi = Field("auto", description="MIDI backend; auto = ALSA if the sequencer exists, else a running JACK server")
    client_name: str = Field("cadenza", description="client name shown to other MIDI software")
    in_port: str = Field(
        "cadenza in", description="input: a virtual port of this name, or an existing port's name or /regex/ when attach_in is set"
    )
    out_port: str = Field(
        "cadenza out", description="output: a virtual port of this name, or an existing port's name or /regex/ when attach_out is set"
    )
    attach_in: bool = Field(False, description="attach to an existing input port instead of creating a virtual one")
    attach_out: bool = Field(False, description="attach to an existing output port instead of creating a virtual one")
    reattach_interval_s: float = Field(1.0, gt=0, description="how often a vanished attached port is looked for again")
    sysex_max_bytes: int = Field(4096, ge=2, le=1 << 20, description="longer SysEx messages are dropped and counted")


class EngineSettings(_Section):
    frame_ms: float = Field(10.0, gt=0, le=200, description="piano-roll frame length")
    window_s: float = Field(
        40.0, gt=0, le=120, description="sliding piano-roll window length; vary mode reads up to 16 bars from it (32 s at 120 bpm)"
    )
    input_queue: int = Field(
        16384, ge=16, description="bound of the input queue; when full, note-ons are dropped (counted), note-offs/pedal/clock never"
    )
    source_queue: int = Field(
        4096,
        ge=16,
        description="messages one source (port, MQTT session) may have waiting in the input queue; "
        "beyond that its note-ons are dropped (counted), so one source cannot fill the queue for all",
    )
    stats_interval_s: float = Field(10.0, ge=0, description="period of the one-line stats log (0 = off)")
    beats_per_bar: int = Field(4, ge=1, le=32, description="the meter, for bar positions from MIDI clock (clock carries none)")
    bpm: float = Field(
        120.0, ge=20, le=400, description="tempo of the sixteenth grid the last bars are read on (vary mode) while no MIDI clock runs"
    )
    busy_poll: bool = Field(
        False,
        description="serve: the event loop never sleeps and reads MIDI input itself (no input thread, no wake-up, the core stays "
        "awake): lowest latency, at the price of one core at 100 percent while serving; for a machine with a core to spare",
    )


class VelocitySettings(_Section):
    mode: Literal["replace", "blend", "flat-only"] = Field(
        "replace", description="replace the player's velocity, blend with it, or colorize only flat input"
    )
    strength: float = Field(1.0, ge=0, le=1, description="blend strength: 0 = player's velocity, 1 = model's")
    deadline_ms: float = Field(3.0, gt=0, le=100, description="per-note deadline; a late model answer is replaced by the fallback velocity")
    fallback_velocity: int = Field(64, ge=1, le=127, description="velocity used when the model misses its deadline or is down")
    flat_window: int = Field(8, ge=2, description="flat-only: this many equal velocities in a row count as flat input")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model worker runs")
    max_batch: int = Field(64, ge=1, description="largest micro-batch across sessions")
    worker: Literal["auto", "thread", "inline"] = Field(
        "auto",
        description="run the model in its own thread, or inline on the event loop right after each input burst; auto = inline on CPU, thread on CUDA",
    )
    keep_warm_ms: float = Field(
        0.0,
        ge=0,
        le=100,
        description="inline worker: while no notes come, run a scratch inference this often (e.g. 1) so that the "
        "model's weights and code stay in the CPU caches (what it changes per note and costs while idle: `cadenza bench velocity`); 0 = off "
        "(with engine.busy_poll, 0 means every 0.5 ms: that core is busy anyway)",
    )
    weights: Path | None = Field(None, description="causal model weights (.safetensors); default: the shipped ones")
    context_weights: Path | None = Field(None, description="full-context model weights; default: the shipped ones")
    lookahead_s: float = Field(0.0, ge=0, le=10, description="lookahead mode: output is delayed by exactly this much")


class PhraseSettings(_Section):
    silence_ms: float = Field(600.0, ge=50, description="a phrase ends after this long with no key down")
    end_cc: int | None = Field(None, ge=0, le=127, description="a CC number that ends the phrase at once (value >= 64)")
    grid: Literal["bar", "beat", "none"] = Field(
        "bar",
        description="with MIDI clock running: the phrase ends on the first bar line (or beat) with no key down, and the answer starts "
        "there; none = ignore the clock (silence ends the phrase, the answer starts at once)",
    )
    length_mode: Literal["seconds", "bars", "call"] = Field(
        "call", description="response length: fixed seconds, bars (needs clock), or as long as the call"
    )
    response_seconds: float = Field(4.0, gt=0, le=60)
    response_bars: int = Field(2, ge=1, le=32)
    max_response_s: float = Field(12.0, gt=0, le=120, description="upper bound for call-length responses")
    out_channel: int | None = Field(None, ge=0, le=15, description="channel of the response (default: the call's)")
    barge_in: Literal["stop", "duck"] = Field(
        "stop", description="when the player plays during a response: stop it, or duck its velocities"
    )
    duck_factor: float = Field(0.4, ge=0, le=1)
    temperature: float = Field(
        0.7, gt=0, le=3, description="sampling temperature of which key the answer strikes (its rhythm is sampled as the model gives it)"
    )
    top_k: int = Field(0, ge=0, description="sample among the k likeliest keys only; 0 = off")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus over the keys to strike (its rhythm is sampled as the model gives it)")
    seed: int | None = Field(None, description="fixed sampling seed (default: random)")
    style: Literal["classical", "pop"] = Field("classical", description="style of the answers: classical (MAESTRO) or pop (POP909)")
    weights: Path | None = Field(None, description="phrase model weights; default: the shipped ones")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    best_of: int = Field(
        4,
        ge=1,
        le=32,
        description="sample this many candidate answers per horizon in one batched pass and keep the one "
        "that scores best (model likelihood + fit to the call, weights fit_*); 1 = off",
    )
    lookahead_s: float = Field(
        1.0, gt=0, le=10, description="best-of-N horizon: candidates are compared over this much music, then the kept one goes on"
    )
    lookahead_tokens: int = Field(
        48,
        ge=1,
        le=256,
        description="at most this many tokens per best-of-N horizon (live, also no more than "
        "generation can afford while the music already generated plays)",
    )
    first_lookahead_tokens: int = Field(
        0,
        ge=0,
        le=256,
        description="tokens of a best-of-N horizon before the first note, which waits for "
        "it (adds to the time to first note: cadenza bench continue); 0 = the first onset is sampled alone "
        "and best-of-N starts once generation is ahead of playback",
    )
    fit_loglik: float = Field(1.0, ge=0, description="best-of-N score: weight of the model's mean log-likelihood per token")
    fit_pc: float = Field(2.0, ge=0, description="best-of-N score: weight of the pitch-class profile correlation with the call")
    fit_register: float = Field(1.0, ge=0, description="best-of-N score: penalty per octave between the mean pitches of answer and call")
    fit_density: float = Field(2.0, ge=0, description="best-of-N score: penalty per doubling/halving of notes per second against the call")
    fit_ioi: float = Field(1.0, ge=0, description="best-of-N score: penalty per doubling/halving of the median inter-onset interval")
    fit_velocity: float = Field(0.0, ge=0, description="best-of-N score: penalty per 16 velocity units between the mean velocities")
    fit_polyphony: float = Field(0.0, ge=0, description="best-of-N score: penalty per doubling/halving of the keys down at an onset")
    key_guard: float = Field(0.0, ge=0, le=20, description="soft guard: logit penalty on notes outside the call's estimated key; 0 = off")
    register_guard: float = Field(
        0.0, ge=0, le=20, description="soft guard: logit penalty per octave beyond the call's range (+ margin); 0 = off"
    )
    register_margin: float = Field(
        5.0, ge=0, le=48, description="semitones beyond the call's lowest/highest note before the register guard bites"
    )
    pace_guard: float = Field(
        2.0,
        ge=0,
        le=20,
        description="soft guard: NOTE_ON logit bias per e-fold the answer runs ahead of (or behind) the call's notes per second; 0 = off",
    )


class VarySettings(_Section):
    """``serve --mode vary``: the performer's loop, played back varied through the MusicVAE."""

    model: Literal["mel_2bar", "mel_16bar"] = Field("mel_2bar", description="the loop is 2 or 16 bars of 4/4, as the model")
    mode: Literal["vary", "morph"] = Field(
        "vary",
        description="vary: the loop's code plus noise; morph: a path from the previous loop to a new one over morph_repeats repetitions",
    )
    amount: float = Field(
        0.6, ge=0, le=3, description="vary: size of the noise added to the loop's latent code (the amount CC sets it 0-2)"
    )
    morph_repeats: int = Field(4, ge=1, le=64, description="morph: repetitions from the old loop to the new one")
    temperature: float = Field(0.0, ge=0, le=3, description="decoder sampling temperature; 0 = greedy (the noise alone varies)")
    min_notes: int = Field(2, ge=1, le=64, description="a loop with fewer notes ends the variation")
    out_channel: int = Field(1, ge=0, le=15, description="MIDI channel of the variation (0-15; default 1 = channel 2)")
    velocity: int = Field(90, ge=1, le=127, description="velocity of the variation's notes")
    seed: int = Field(0, description="first seed of the noise; each loop takes the next")
    inline: bool = Field(
        False,
        description="run the model on the event loop's thread instead of its own (the performer's notes then wait "
        "for each encode + decode)",
    )


class ControlSettings(_Section):
    """Performer controls, as data: CC number -> function. None disables a control."""

    channel: int | None = Field(None, ge=0, le=15, description="channel the control CCs are read on (default: any)")
    strength_cc: int | None = Field(20, ge=0, le=127)
    mode_cc: int | None = Field(21, ge=0, le=127, description="value 0-42 replace, 43-85 blend, 86-127 flat-only")
    bypass_cc: int | None = Field(22, ge=0, le=127, description="value >= 64 bypasses the model")
    panic_cc: int | None = Field(23, ge=0, le=127, description="value >= 64 releases every note")
    temperature_cc: int | None = Field(24, ge=0, le=127, description="maps 0-127 to temperature 0.2-1.8")
    length_cc: int | None = Field(25, ge=0, le=127, description="maps 0-127 to 1-16 s")
    phrase_cc: int | None = Field(26, ge=0, le=127, description="value >= 64 turns continuation on")
    vary_amount_cc: int | None = Field(28, ge=0, le=127, description="vary: maps 0-127 to noise amount 0-2")
    vary_mode_cc: int | None = Field(29, ge=0, le=127, description="vary: value < 64 vary, >= 64 morph")
    density_cc: int | None = Field(30, ge=0, le=127, description="vary: note density attribute, 64 = as played, 0 / 127 = -2 / +2")
    register_cc: int | None = Field(31, ge=0, le=127, description="vary: register attribute, 64 = as played")
    interval_cc: int | None = Field(102, ge=0, le=127, description="vary: interval-size attribute, 64 = as played")
    syncopation_cc: int | None = Field(103, ge=0, le=127, description="vary: syncopation attribute, 64 = as played")
    state_out_cc: int | None = Field(
        27, ge=0, le=127, description="the engine reports its state (0 idle, 64 listening, 127 responding) on this CC"
    )
    consume: bool = Field(True, description="control CCs are not passed through to the output")

    @model_validator(mode="after")
    def _distinct(self) -> ControlSettings:
        used = [(n, v) for n, v in self.__dict__.items() if n.endswith("_cc") and v is not None]
        seen: dict[int, str] = {}
        for name, cc in used:
            if cc in seen:
                raise ValueError(f"CC {cc} is mapped to both {seen[cc]} and {name}")
            seen[cc] = name
        return self


class AudioSettings(_Section):
    soundfont: Path | None = Field(None, description="General MIDI .sf2; default: the first one the OS packages installed")
    sample_rate: int = Field(48000, ge=8000, le=192000)
    block_size: int = Field(128, ge=16, le=8192, description="audio block size in frames")
    device: str | None = Field(None, description="sounddevice output device name or index (default: system default)")
    gain: float = Field(0.5, gt=0, le=5)


class MqttSettings(_Section):
    """The headless daemon's transport (``cadenza serve --transport mqtt``) and the bridge's."""

    host: str = Field("localhost", min_length=1, description="MQTT broker host")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port")
    username: str | None = Field(None, description="broker user name (none: anonymous)")
    password: SecretStr | None = Field(None, description="broker password; set it through CADENZA_MQTT__PASSWORD rather than a file")
    topic_prefix: str = Field("cadenza", pattern=r"^[A-Za-z0-9_.\-/]+$", description="first topic level(s): PREFIX/SESSION/in, /out, /bye")
    client_id: str | None = Field(None, description="MQTT client id (default: cadenza-HOST-PID)")
    keepalive_s: int = Field(
        30, ge=1, le=3600, description="MQTT keepalive; a silent peer (a daemon cut off the network) is declared gone after 1.5x this"
    )
    out_qos: int = Field(0, ge=0, le=1, description="QoS of outgoing MIDI (0: lowest latency)")
    max_sessions: int = Field(256, ge=1, le=100_000, description="sessions beyond this many are refused (their input dropped and counted)")
    session_idle_s: float = Field(
        300.0, ge=0, description="a session with no input for this long is ended (notes released, state freed); 0 = never"
    )
    max_payload_bytes: int = Field(262_144, ge=16, le=1 << 24, description="larger payloads are dropped and counted")
    capacity: float = Field(
        1.0, gt=0, le=1e5, description="this daemon's share of the sessions, relative to the other daemons on the broker (e.g. its GPUs)"
    )
    stop_deadline_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="a daemon still stopping this long after SIGINT/SIGTERM writes every thread's stack to its log and "
        "exits 1 (its stop is bounded piece by piece well below the default; keep it under systemd's TimeoutStopSec)",
    )
    status_interval_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="a daemon repeats its retained status this often, and daemons and bridges drop one not heard from "
        "for 3 intervals (a status left by a daemon that died while the broker was down); 0 = off. The same on every party",
    )
    session_msgs_per_s: float = Field(1000.0, ge=0, description="input messages a second one session may send (0 = no limit)")
    session_burst_msgs: int = Field(2000, ge=1, description="messages one session may send at once above its rate")
    session_bytes_per_s: float = Field(65_536.0, ge=0, description="input bytes a second one session may send (0 = no limit)")
    session_burst_bytes: int = Field(
        262_144, ge=16, description="bytes one session may send at once above its rate (keep >= max_payload_bytes)"
    )
    reconnect_interval_s: float = Field(2.0, gt=0, le=300, description="wait between reconnection attempts after the broker is lost")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="how long the first connection may take before the command fails")
    # Security: TLS and credentials (docs/operators.md#security, deploy/).
    password_file: Path | None = Field(
        None, description="file holding the broker password (read at each connect, whitespace stripped); instead of mqtt.password"
    )
    tls_ca_file: Path | None = Field(
        None, description="CA certificate(s), PEM, that the broker's certificate must chain to; setting it turns TLS on (port 8883)"
    )
    tls_cert_file: Path | None = Field(None, description="client certificate, PEM, for a broker that asks for one (needs tls_ca_file)")
    tls_key_file: Path | None = Field(None, description="the client certificate's private key, PEM (default: in tls_cert_file)")

    # Field validators rather than one model validator: a model validator's error shows the whole
    # section as its input, and that would print the password.
    @field_validator("password_file")
    @classmethod
    def _one_password(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and info.data.get("password") is not None:
            raise ValueError("set mqtt.password or mqtt.password_file, not both")
        if v is not None and info.data.get("username") is None:
            raise ValueError("mqtt.password_file needs mqtt.username")
        return v

    @field_validator("tls_cert_file")
    @classmethod
    def _cert_needs_tls(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and info.data.get("tls_ca_file") is None:
            raise ValueError("mqtt.tls_cert_file needs mqtt.tls_ca_file (a client certificate is sent only over TLS)")
        return v

    @field_validator("tls_key_file")
    @classmethod
    def _key_needs_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and info.data.get("tls_cert_file") is None:
            raise ValueError("mqtt.tls_key_file needs mqtt.tls_cert_file")
        return v


class MetricsSettings(_Section):
    """The Prometheus endpoint of ``cadenza serve`` and of the MQTT daemon (off by default)."""

    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="serve the metrics for Prometheus on this TCP port (0 = any free port); unset = off"
    )
    prometheus_host: str = Field(
        "127.0.0.1", min_length=1, description="address the Prometheus endpoint listens on (0.0.0.0 or :: = every interface)"
    )


class DataSettings(_Section):
    root: Path = Field(default_factory=lambda: _default_data_root(), description="folder holding maestro-v2.0.0/ and pop909/")

    @property
    def maestro(self) -> Path:
        return self.root / "maestro-v2.0.0"

    @property
    def pop909(self) -> Path:
        return self.root / "pop909"


def _default_data_root() -> Path:
    here = Path(__file__).resolve().parent.parent
    for cand in (Path.cwd() / ".." / "shared" / "data", here / ".." / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return Path("../shared/data")


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(env_prefix="CADENZA_", env_nested_delimiter="__", extra="forbid", validate_assignment=True)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    midi: MidiSettings = MidiSettings()
    engine: EngineSettings = EngineSettings()
    velocity: VelocitySettings = VelocitySettings()
    phrase: PhraseSettings = PhraseSettings()
    vary: VarySettings = VarySettings()
    controls: ControlSettings = ControlSettings()
    audio: AudioSettings = AudioSettings()
    mqtt: MqttSettings = MqttSettings()
    metrics: MetricsSettings = MetricsSettings()
    data: DataSettings = DataSettings()

    @model_validator(mode="after")
    def _end_cc_free(self) -> Settings:
        """The phrase's end-call CC is passed on to the phrase stage only if no control takes it."""
        end = self.phrase.end_cc
        taken = {n: v for n, v in self.controls.__dict__.items() if n.endswith("_cc") and n != "state_out_cc" and v is not None}
        for name, cc in taken.items():
            if cc == end:
                raise ValueError(f"CC {cc} is mapped to both phrase.end_cc and controls.{name}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _TOML_PATH is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_TOML_PATH))
        return tuple(sources)


_TOML_PATH: Path | None = None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(config_file: str | os.PathLike | None = None, overrides: dict | None = None) -> Settings:
    """Build the effective settings; raise ConfigError with one line on any bad value.

    ``overrides`` is a nested dict (``{"velocity": {"deadline_ms": 2.0}}``) from the CLI.
    """
    global _TOML_PATH
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        _TOML_PATH = path
    else:
        _TOML_PATH = None
    try:
        init: dict = {}
        if overrides:
            # Sections given on the CLI are merged over those from env/TOML field by field,
            # so construct once without them and then apply the overrides.
            base = Settings()
            init = _deep_merge(base.model_dump(), overrides)
        return Settings(**init)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    except (ValueError, OSError) as exc:  # TOML syntax errors, unreadable file
        raise ConfigError(f"cannot read config: {exc}".replace("\n", " ")) from None
    finally:
        _TOML_PATH = None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid config value {loc}={value!r}: {err['msg']}{more}"


def to_toml(settings: Settings) -> str:
    """Render settings as TOML that :func:`load_settings` reads back to the same values."""
    data = settings.model_dump(mode="json")
    lines: list[str] = []
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in top.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append("")
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(getattr(getattr(settings, section), k), SecretStr):
                lines.append(f"# {k} = (set, not shown)")
            elif v is None:
                lines.append(f"# {k} = (unset)")
            else:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot render {v!r} as TOML")
