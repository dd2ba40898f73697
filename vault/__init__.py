"""The vault: named credentials whose secrets live in a keyring and are used only by the proxy."""

from __future__ import annotations

from corral.vault.config import VaultSettings
from corral.vault.keyrings import Choice, TimedKeyring, choose_backend
from corral.vault.policy import Credential
from corral.vault.store import Vault

__all__ = ["Choice", "Credential", "Vault", "VaultSettings", "open_vault"]


def open_vault(settings: VaultSettings, bus_address: str | None) -> tuple[Vault, Choice]:
    """The vault on the backend CORRAL_VAULT_BACKEND asks for (see `vault.keyrings`)."""
    directory = settings.vault_dir()
    choice = choose_backend(settings.vault_backend, directory, settings.keyring_timeout_s, bus_address)
    return Vault(directory, TimedKeyring(choice.backend, settings.keyring_timeout_s)), choice
