"""A client's parameters with bytes and effects alone: SET, RESET, RESET ALL, corrections."""

from __future__ import annotations

from pgproxy import sql
from pgproxy.client.settings import ClientSettings
from pgproxy.protocol import messages as m

SEARCH_A = "SELECT pg_catalog.set_config('search_path', 'a', false)"
SEARCH_B = "SELECT pg_catalog.set_config('search_path', 'b', false)"


def _settings() -> ClientSettings:
    return ClientSettings(
        {"TimeZone": "Europe/Paris", "application_name": "app", "client_encoding": "UTF8"},
        {"search_path": SEARCH_A},  # from the startup packet
    )


def test_reset_of_a_reported_parameter_is_corrected_to_the_startup_value() -> None:
    settings = _settings()
    # The pooled server's own default is UTC: after RESET it reports that.
    settings.server_reported("TimeZone", "UTC")
    change = settings.apply([sql.SetParameter("timezone", None)])
    assert not change.changed  # reported parameters follow by ParameterStatus
    assert settings.corrections_due
    out, changed = settings.corrections()
    assert out == m.parameter_status("TimeZone", "Europe/Paris")
    assert changed and settings.reported["TimeZone"] == "Europe/Paris"
    assert settings.corrections() == (b"", False)


def test_a_set_after_a_reset_in_the_same_unit_wins() -> None:
    settings = _settings()
    settings.server_reported("TimeZone", "Asia/Tokyo")
    settings.apply([sql.SetParameter("timezone", None), sql.SetParameter("timezone", "SET x")])
    assert settings.corrections() == (b"", False)
    assert settings.reported["TimeZone"] == "Asia/Tokyo"


def test_no_correction_when_the_server_already_reports_the_startup_value() -> None:
    settings = _settings()
    settings.apply([sql.SetParameter("timezone", None)])
    out, _ = settings.corrections()
    assert out == b""


def test_set_and_reset_of_unreported_parameters_follow_the_client() -> None:
    settings = _settings()
    before = settings.snapshot()
    change = settings.apply([sql.SetParameter("search_path", SEARCH_B)])
    assert change.changed and change.proxy_set == {"search_path": SEARCH_B}
    assert settings.unreported == {"search_path": SEARCH_B}
    assert settings.snapshot() is not before  # a server in the old state is resynchronised
    change = settings.apply([sql.SetParameter("search_path", None)])
    assert settings.unreported == {"search_path": SEARCH_A}  # RESET: back to the startup value
    assert change.proxy_set == {"search_path": None}
    change = settings.apply([sql.SetParameter("statement_timeout", "SET t")])
    change = settings.apply([sql.SetParameter("statement_timeout", None)])
    assert "statement_timeout" not in settings.unreported  # no startup value: gone
    assert settings.snapshot() is before  # equal parameters share one snapshot


def test_reset_all_returns_everything_to_startup_values() -> None:
    settings = _settings()
    settings.server_reported("TimeZone", "UTC")
    settings.server_reported("application_name", "")
    change = settings.apply(
        [sql.SetParameter("search_path", SEARCH_B), sql.ResetAll(), sql.SetParameter("x", "SET x")]
    )
    assert change.reset_all
    # What the unit SET before RESET ALL is gone too; what it SET after stays.
    assert change.proxy_set == {"x": "SET x"}
    assert settings.unreported == {"search_path": SEARCH_A, "x": "SET x"}
    out, _ = settings.corrections()
    assert out == m.parameter_status("TimeZone", "Europe/Paris") + m.parameter_status(
        "application_name", "app"
    ) or out == m.parameter_status("application_name", "app") + m.parameter_status(
        "TimeZone", "Europe/Paris"
    )


def test_read_only_parameters_are_never_taken_from_a_server() -> None:
    settings = _settings()
    settings.server_reported("server_version", "99")
    assert "server_version" not in settings.reported


def test_the_listen_fast_path_needs_utf8_and_standard_strings() -> None:
    settings = _settings()
    assert settings.text_rules_ok()
    settings.server_reported("standard_conforming_strings", "off")
    assert not settings.text_rules_ok()
    settings.server_reported("standard_conforming_strings", "on")
    settings.server_reported("client_encoding", "LATIN1")
    assert not settings.text_rules_ok()
