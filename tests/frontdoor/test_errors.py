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


def test_log_level_debug_shows_the_traceback_of_an_unexpected_error_for_every_command(
    corral_env: dict[str, str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**corral_env, "CORRAL_HOME": str(blocker / "corral")}  # the data dir cannot be made: not a Corral error
    for command in (["sessions", "list"], ["vault", "list"]):
        line = one_line_error(corral(*command, env=env))
        assert "unexpected NotADirectoryError" in line and "CORRAL_LOG_LEVEL=DEBUG" in line
        done = corral(*command, env={**env, "CORRAL_LOG_LEVEL": "debug"})
        assert done.returncode == 1 and "Traceback" in done.stderr and "NotADirectoryError" in done.stderr, done.stderr


def test_a_bad_log_level_is_one_invalid_argument_line(corral_env: dict[str, str]) -> None:
    line = one_line_error(corral("sessions", "list", env={**corral_env, "CORRAL_LOG_LEVEL": "LOUD"}))
    assert line.startswith("corral: invalid_argument:") and "CORRAL_LOG_LEVEL" in line and "DEBUG" in line


def test_an_unknown_harness_server_is_invalid_argument(corral_env: dict[str, str]) -> None:
    env = {
        **corral_env,
        "CORRAL_SERVERS": "sandbox,sandbx",
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
    }
    line = one_line_error(corral("run", "hi", env=env))
    assert (
        line.startswith("corral: invalid_argument:")
        and "CORRAL_SERVERS" in line
        and "'sandbx'" in line
        and "CORRAL_EXTRA_SERVERS" in line
    )
