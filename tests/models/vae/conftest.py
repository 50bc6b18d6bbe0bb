from __future__ import annotations

import pytest


@pytest.fixture()
def vae_main(monkeypatch):
    """cadenza.cli.main with the VAE commands registered (until the lead lists them in COMMAND_MODULES)."""
    import cadenza.cli as cli

    if "cadenza.models.vae.cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(cli.COMMAND_MODULES) + ("cadenza.models.vae.cli",))
    return cli.main


@pytest.fixture(scope="session")
def pop909_root(settings):
    root = settings.data.pop909
    if not (root / "001" / "001.mid").is_file():
        pytest.skip(f"POP909 not found at {root} (set CADENZA_DATA__ROOT)")
    return root
