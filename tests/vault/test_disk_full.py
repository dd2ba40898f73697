"""`corral vault set` on a full disk (issue 18, item 4): the error names the full disk and
where to free space, the vault's files are as they were (no half-written keyring or
policy file, no temporary file left), and `set` works again once space is freed."""

from __future__ import annotations

import json

from tests.conftest import fill_disk

from .conftest import Cli

SECRET = "ghp_Disk-Full-Secret-0123456789"
OTHER = "ghp_Disk-Full-Other-9876543210"


def test_vault_set_on_a_full_disk_is_named_loses_nothing_and_works_once_space_is_freed(small_disk, monkeypatch, capsys):
    cli = Cli(small_disk, monkeypatch, capsys)
    assert cli("set", "gh", "--host", "api.github.com", stdin=SECRET).returncode == 0
    files = {p.name: p.read_bytes() for p in cli.vault_dir.iterdir() if not p.name.endswith(".lock")}
    filler = fill_disk(small_disk)
    done = cli("set", "other", "--host", "a.example.com", stdin=OTHER)
    assert done.returncode == 1
    assert done.stderr.strip() == f"corral: unavailable: no space left on device (free space under {cli.vault_dir})"
    assert "Traceback" not in done.stderr and OTHER not in done.stderr
    after = {p.name: p.read_bytes() for p in cli.vault_dir.iterdir() if not p.name.endswith(".lock")}
    assert after == files  # the old keyring and policy file, whole; no temporary file left
    assert "gh: secret present" in cli("doctor").stdout
    filler.unlink()  # space is freed: the next `set` works
    assert cli("set", "other", "--host", "a.example.com", stdin=OTHER).returncode == 0, (
        "set failed after space was freed"
    )
    assert [c["name"] for c in json.loads(cli("list", "--json").stdout)] == ["gh", "other"]
    doctor = cli("doctor").stdout
    assert "gh: secret present" in doctor and "other: secret present" in doctor
