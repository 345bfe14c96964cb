"""Settings from the environment (``modbox_kernel/settings.py``) and a cell's time limit.

In process: each kind of setting parsed from a given environment, and the sentence a
malformed one gives. Through a real kernel (``test_kernel_settings.py``): that sentence
is the first cell's error and the kernel stays alive.
"""

from __future__ import annotations

import pytest

from modbox_kernel.cellcontrol import TIMEOUT_MAGIC, cell_time_limit
from modbox_kernel.settings import SETTINGS, EnvSettings


def test_unset_and_empty_variables_give_the_defaults() -> None:
    env = EnvSettings({"MODBOX_TTL_SECONDS": "", "MODBOX_COPY_WORKDIR": "  "})
    assert env.problems == []
    assert env.integer("ttl_seconds") == 3600
    assert env.flag("copy_workdir") is True
    assert env.text("backend") == "auto"
    assert env.number("cell_timeout") == 0.0
    assert env.integer("output_limit") == 10 * 1024 * 1024


def test_valid_values_of_each_kind() -> None:
    env = EnvSettings(
        {
            "MODBOX_TTL_SECONDS": " 120 ",
            "MODBOX_CELL_TIMEOUT": "2.5",
            "MODBOX_COPY_WORKDIR": "Off",
            "MODBOX_BACKEND": "LOCAL",
            "MODBOX_API_URL": "http://127.0.0.1:9/",
            "MODBOX_REQUIRE_ISOLATION": "yes",
        }
    )
    assert env.problems == []
    assert env.integer("ttl_seconds") == 120
    assert env.number("cell_timeout") == 2.5
    assert env.flag("copy_workdir") is False
    assert env.text("backend") == "local"
    assert env.text("api_url") == "http://127.0.0.1:9/"
    assert env.flag("require_isolation") is True


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("MODBOX_TTL_SECONDS", "1h", "a whole number of seconds of at least 1, for example 3600"),
        ("MODBOX_TTL_SECONDS", "1.5", "a whole number"),
        ("MODBOX_TTL_SECONDS", "0", "at least 1"),
        ("MODBOX_CELL_TIMEOUT", "nan", "a number of seconds of at least 0"),
        ("MODBOX_CELL_TIMEOUT", "-1", "at least 0"),
        ("MODBOX_OUTPUT_LIMIT", "10MB", "a whole number of bytes"),
        ("MODBOX_COPY_WORKDIR", "maybe", "1 or 0 (also true/false, yes/no, on/off)"),
        ("MODBOX_BACKEND", "cloud", "one of auto, local, remote"),
        ("MODBOX_LOCAL_ISOLATION", "docker", "one of auto, bwrap, none"),
    ],
)
def test_a_malformed_value_is_one_sentence_naming_the_variable(
    variable: str, value: str, accepts: str
) -> None:
    env = EnvSettings({variable: value})
    (sentence,) = env.problems
    assert sentence.startswith(f"{variable}={value!r} is not a valid value")
    assert f"{variable} accepts" in sentence and accepts in sentence
    # The setting itself falls back to its default, so nothing raises while building.
    name = next(n for n, s in SETTINGS.items() if s.env == variable)
    assert env.value(name) == SETTINGS[name].default


def test_several_bad_variables_are_all_reported() -> None:
    env = EnvSettings({"MODBOX_BACKEND": "x", "MODBOX_COPY_LIMIT": "lots"})
    assert [p.split("=")[0] for p in env.problems] == ["MODBOX_BACKEND", "MODBOX_COPY_LIMIT"]


def test_a_long_value_is_shortened_in_the_sentence() -> None:
    (sentence,) = EnvSettings({"MODBOX_TTL_SECONDS": "9" * 500 + "x"}).problems
    assert len(sentence) < 300 and "..." in sentence


def test_the_time_limit_line_is_stripped_but_keeps_the_line_numbers() -> None:
    code, limit, warning = cell_time_limit(f"{TIMEOUT_MAGIC} 2.5\nimport time\nx = 1", 0)
    assert (code, limit, warning) == ("\nimport time\nx = 1", 2.5, None)
    assert cell_time_limit(f"  {TIMEOUT_MAGIC} 3", 10) == ("", 3.0, None)


def test_without_the_line_the_configured_limit_applies() -> None:
    assert cell_time_limit("x = 1", 7) == ("x = 1", 7.0, None)
    assert cell_time_limit(f"x = 1\n{TIMEOUT_MAGIC} 3", 0) == (
        f"x = 1\n{TIMEOUT_MAGIC} 3",
        0.0,
        None,
    )


def test_a_non_numeric_time_limit_is_ignored_with_a_warning() -> None:
    code, limit, warning = cell_time_limit(f"{TIMEOUT_MAGIC} soon\npass", 4)
    assert (code, limit) == ("\npass", 4.0)
    assert warning is not None and "non-numeric" in warning
