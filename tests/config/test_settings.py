import pytest

from cadenza.config.settings import load_settings, to_toml
from cadenza.errors import ConfigError


def test_toml_round_trip(tmp_path):
    s = load_settings(overrides={"velocity": {"deadline_ms": 2.5, "mode": "blend"}, "midi": {"in_port": 'my "keys"'}})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(s))
    assert load_settings(path) == s


def test_env_overrides_toml_and_cli_overrides_env(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text("[velocity]\ndeadline_ms = 4.0\nstrength = 0.5\n")
    monkeypatch.setenv("CADENZA_VELOCITY__DEADLINE_MS", "2.0")
    s = load_settings(path)
    assert s.velocity.deadline_ms == 2.0 and s.velocity.strength == 0.5
    s = load_settings(path, {"velocity": {"deadline_ms": 1.0}})
    assert s.velocity.deadline_ms == 1.0 and s.velocity.strength == 0.5


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ("[velocity]\ndeadline_ms = -1\n", "velocity.deadline_ms"),
        ("[velocity]\nmode = 'loud'\n", "velocity.mode"),
        ("[midi]\napi = 'dx7'\n", "midi.api"),
        ("[engine]\nbogus = 1\n", "engine.bogus"),
        ("[controls]\nmode_cc = 20\n", "CC 20"),
        ("[phrase]\nend_cc = 30\n", "CC 30 is mapped to both phrase.end_cc and controls.density_cc"),
        ("[vary]\nmode = 'shuffle'\n", "vary.mode"),
        ("[velocity\n", "cannot read config"),
    ],
)
def test_bad_values_fail_with_one_line(tmp_path, toml, fragment):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
