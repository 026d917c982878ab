"""The alert rules are valid Prometheus rules, and promtool's unit tests show each one firing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.observability.conftest import ALERTS, ALERTS_TEST
from tests.tools import binary


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)


def alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_shown_firing_in_the_unit_tests() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alert_names() == fired
    required = {
        "FineserveHighErrorRatio",
        "FineserveHighP99Latency",
        "FineserveQueueSaturated",
        "FineserveModelNotLoaded",
        "FineserveTargetDown",
        "FineserveMetricsAbsent",
    }
    assert required <= fired


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    # The unit tests can fail: with the error-ratio threshold raised to 50%, its test must.
    broken = ALERTS.read_text().replace("            > 0.05", "            > 0.5")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST.read_text())
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0
    assert "FineserveHighErrorRatio" in result.stdout + result.stderr
