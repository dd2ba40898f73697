"""Errors a person can act on: one line saying what is wrong and what to do, never a traceback.

Driven through the `corral` command the way a user meets them.
"""

from __future__ import annotations

from pathlib import Path

from tests.frontdoor.conftest import CORRAL, corral, free_port, one_line_error


def path_without_bwrap(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "corral").symlink_to(CORRAL)
    return str(bin_dir)


def test_up_without_bwrap_says_install_bubblewrap(corral_env: dict[str, str], tmp_path: Path) -> None:
    env = {**corral_env, "PATH": path_without_bwrap(tmp_path)}
    line = one_line_error(corral("up", "--port", str(free_port()), env=env, timeout=60))
    assert "bwrap" in line and "apt-get install bubblewrap" in line


def test_up_without_an_os_keyring_says_what_to_use_instead(corral_env: dict[str, str]) -> None:
    env = {**corral_env, "CORRAL_VAULT_BACKEND": "os"}  # asked for the OS keyring; a headless box has none
    line = one_line_error(corral("up", "--port", str(free_port()), env=env, timeout=60))
    assert "keyring" in line and "CORRAL_VAULT_BACKEND=encrypted-file" in line


def test_run_without_an_api_key_says_which_variable(corral_env: dict[str, str]) -> None:
    done = corral("run", "say hello", env=corral_env, timeout=60)  # corral_env drops ANTHROPIC_*
    line = one_line_error(done)
    assert "ANTHROPIC_API_KEY" in line and "export" in line


def test_unknown_server_name_and_bad_arguments_are_usage_errors(corral_env: dict[str, str]) -> None:
    done = corral("mcp-config", "vscode", env=corral_env)
    assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr
