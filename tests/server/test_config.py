"""Settings: precedence of flags, environment and file; rules checked at startup; the CLI's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fineserve.server.__main__ import build_parser, main
from fineserve.server.config import Settings, SettingsError, load_settings, unknown_environment_variables


def test_defaults_match_the_documented_ports() -> None:
    settings = load_settings()
    assert (settings.grpc_port, settings.metrics_port) == (8001, 8002)


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("max_batch_size: 4\nmax_queue_delay_ms: 7\nlog_level: DEBUG\n")
    monkeypatch.setenv("FINESERVE_MAX_QUEUE_DELAY_MS", "3")
    monkeypatch.setenv("FINESERVE_PREFERRED_BATCH_SIZES", "[2, 4]")
    settings = load_settings(config_file=config, log_level="ERROR")
    assert settings.max_batch_size == 4  # file
    assert settings.max_queue_delay_ms == 3  # environment over file
    assert settings.log_level == "ERROR"  # flag over file
    assert settings.preferred_batch_sizes == [2, 4]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"preferred_batch_sizes": [16], "max_batch_size": 8}, "preferred_batch_sizes [16]"),
        ({"batching": {"fashion": {"max_batch_size": 4, "preferred_batch_sizes": [8]}}}, "batching.fashion."),
        ({"batching": {"fashion": {"max_batch": 4}}}, "max_batch"),
        (
            {"max_request_bytes": 10_000, "max_receive_message_bytes": 5000},
            "cannot exceed max_receive_message_bytes",
        ),
        ({"max_receive_message_bytes_per_model": {"fashion": 10}}, "{'fashion': 10}: each must be >= 1024"),
        ({"grpc_max_concurrent_streams": 0}, "grpc_max_concurrent_streams"),
        ({"metrics_timeout_s": 0}, "metrics_timeout_s"),
        ({"version_policy": "specific"}, "needs specific_versions"),
        ({"grpc_port": 9000, "metrics_port": 9000}, "both 9000"),
        ({"device": "cuda", "precision": "int8"}, "int8"),
        ({"sequence_buckets": [0, 8]}, "sequence_buckets [0, 8] must each be at least 1"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"device": "tpu"}, "device"),
        ({"no_such_setting": 1}, "no_such_setting"),
        # A typo, not a tuning: an infinite or minutes-long batch delay, thousands of instances.
        ({"max_queue_delay_ms": float("inf")}, "max_queue_delay_ms: Input should be a finite number"),
        ({"max_queue_delay_ms": 1e9}, "max_queue_delay_ms: Input should be less than or equal to 10000"),
        ({"repository_poll_s": float("nan")}, "repository_poll_s: Input should be a finite number"),
        ({"instances": 100_000}, "instances: Input should be less than or equal to 64"),
        (
            {"batching": {"fashion": {"max_queue_delay_ms": float("inf")}}},
            "batching.fashion.max_queue_delay_ms",
        ),
    ],
)
def test_invalid_settings_are_refused_naming_the_setting(values: dict[str, object], words: str) -> None:
    with pytest.raises(SettingsError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_settings(**values)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpc_prot: 1\n")
    with pytest.raises(SettingsError, match="unknown settings grpc_prot"):
        load_settings(config_file=bad)
    with pytest.raises(SettingsError, match=r"missing\.yaml: No such file or directory$"):
        load_settings(config_file=tmp_path / "missing.yaml")
    # One line each, where PyYAML's own message quotes the file over several.
    bad.write_text("grpc_port: [1,\n  x: y\n")
    with pytest.raises(SettingsError) as broken:
        load_settings(config_file=bad)
    problem = "line 3, column 1: expected ',' or ']', but got '<stream end>'"
    assert str(broken.value) == f"config file {bad}: not valid YAML ({problem})"
    bad.write_bytes(b"\xff\xfe grpc_port: 1")
    with pytest.raises(SettingsError, match="not UTF-8 text"):
        load_settings(config_file=bad)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PREFERRED_BATCH_SIZES", "abc"), ("PREFERRED_BATCH_SIZES", "[1,2"), ("BATCHING", "notjson")],
)
def test_a_list_or_map_in_the_environment_that_is_not_json_is_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(f"FINESERVE_{variable}", value)
    with pytest.raises(SettingsError, match=f"{variable.lower()}.*are JSON") as err:
        load_settings()
    assert "\n" not in str(err.value)


def test_every_setting_is_documented_and_has_a_flag_or_file_entry() -> None:
    flags = {action.dest for action in build_parser()._actions}
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no documentation"
        maps = ("specific_versions", "batching", "max_receive_message_bytes_per_model")
        assert name in flags or name in maps, f"{name} has no flag"


def test_cli_answers_a_bad_value_with_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--grpc-port", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("fineserve serve: error: grpc_port: Input should be a valid integer")


def test_per_model_batching_overrides_the_server_wide_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FINESERVE_BATCHING", '{"sentiment": {"max_queue_delay_ms": 10, "max_batch_size": 16}}'
    )
    settings = load_settings(max_batch_size=32, max_queue_size=50)
    sentiment = settings.batching_for("sentiment")
    # The delay is set in ms and kept in seconds.
    assert (sentiment.max_batch_size, sentiment.max_queue_delay_s, sentiment.max_queue_size) == (16, 0.01, 50)
    other = settings.batching_for("fashion")
    assert (other.max_batch_size, other.max_queue_delay_s) == (32, 0.002)


def test_inline_run_limit_can_be_set_per_model() -> None:
    settings = load_settings(inline_run_us=250, batching={"sentiment": {"inline_run_us": 0}})
    assert settings.batching_for("sentiment").inline_run_s == 0  # never on the loop
    assert settings.batching_for("fashion").inline_run_s == 250e-6
    assert load_settings().batching_for("fashion").inline_run_s == 100e-6
    with pytest.raises(SettingsError, match=r"batching\.sentiment\.inline_run_us"):
        load_settings(batching={"sentiment": {"inline_run_us": -1}})


def test_instances_can_be_set_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINESERVE_BATCHING", '{"sentiment": {"instances": 1}}')
    settings = load_settings(instances=3)
    assert settings.batching_for("sentiment").instances == 1
    assert settings.batching_for("fashion").instances == 3
    assert load_settings().batching_for("fashion").instances == 0  # measured at load
    # 0 per model asks for the measurement even where the server-wide setting is fixed.
    assert (
        load_settings(instances=2, batching={"sentiment": {"instances": 0}})
        .batching_for("sentiment")
        .instances
        == 0
    )
    with pytest.raises(SettingsError, match=r"batching\.sentiment\.instances"):
        load_settings(batching={"sentiment": {"instances": -1}})


def test_unknown_fineserve_variables_are_named_for_a_warning() -> None:
    environ = {
        "FINESERVE_GRPC_PORT": "1",  # a setting
        "FINESERVE_GRPC_PROT": "1",  # a typo: the server warns at startup
        "FINESERVE_DATA_CACHE": "/d",  # the training data cache's, not the server's
        "PATH": "/bin",
    }
    assert unknown_environment_variables(environ) == ["FINESERVE_GRPC_PROT"]


def test_kubernetes_service_links_are_not_taken_for_typos() -> None:
    # Kubernetes injects these into every pod for the Service named "fineserve".
    links = {
        "FINESERVE_SERVICE_HOST": "10.0.0.1",
        "FINESERVE_SERVICE_PORT": "8001",
        "FINESERVE_SERVICE_PORT_GRPC": "8001",
        "FINESERVE_PORT": "tcp://10.0.0.1:8001",
        "FINESERVE_PORT_8001_TCP": "tcp://10.0.0.1:8001",
        "FINESERVE_PORT_8001_TCP_ADDR": "10.0.0.1",
    }
    assert unknown_environment_variables(links) == []


def test_an_unreadable_token_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret")
    read_text = Path.read_text

    def denied(path: Path, *args: Any, **kwargs: Any) -> str:
        # A secret mounted with the wrong owner; as root (here) chmod cannot make a file unreadable.
        if path == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(SettingsError, match=r"inference_token_file: .*token: Permission denied"):
        load_settings(inference_token_file=secret)
