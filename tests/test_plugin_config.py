"""Options, ini keys, boxlite.yaml profiles and the marker: precedence, usage errors, --help. No VM boots here:
the settings are read through the `box_options` fixture, which only computes options."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

SHOW_OPTIONS = """
import pytest

def test_options(box_options):
    print("OPTIONS", box_options.image, box_options.cpus, box_options.memory_mib, box_options.network,
          box_options.host_ports, sorted(box_options.env.items()))

@pytest.mark.boxlite(memory_mib=400, env={"WHO": "marker"}, network=True, host_ports=[8080])
def test_marker_wins(box_options):
    print("MARKER", box_options.image, box_options.memory_mib, box_options.network, box_options.host_ports,
          sorted(box_options.env.items()))

@pytest.mark.boxlite(profile="small")
def test_marker_profile(box_options):
    print("PROFILE", box_options.image, box_options.memory_mib, box_options.cpus)
"""

YAML = """
default_profile: base
profiles:
  base: {image: "dir:/from-yaml", memory_mib: 256, network: full, env: {WHO: yaml}}
  small: {image: "dir:/small", memory_mib: 128, cpus: 1}
"""


def test_precedence_marker_over_command_line_over_ini_over_yaml(pytester):
    pytester.makefile(".yaml", boxlite=YAML)
    pytester.makeini("[pytest]\nboxlite_memory_mib = 300\nboxlite_image = dir:/from-ini\n"
                     "boxlite_host_ports = 5432, 6379\n")
    pytester.makepyfile(SHOW_OPTIONS)
    result = pytester.runpytest("-s", "--boxlite-image=dir:/from-cli")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines_random([
        "*OPTIONS dir:/from-cli 1 300 full (5432, 6379) [[]('WHO', 'yaml')[]]",
        "*MARKER dir:/from-cli 400 internet (8080,) [[]('WHO', 'marker')[]]",
        "*PROFILE dir:/from-cli 300 1",  # the marker's profile sits under the command line and ini
        "boxlite: marked tests in boxes, engine *, image dir:/from-cli, scope test, snapshots *, pool *",
    ])


def write_project(pytester, files):
    """A one-test project with the given pytest.ini ("ini") and boxlite.yaml ("yaml") texts."""
    if "ini" in files:
        pytester.makeini(files["ini"])
    if "yaml" in files:
        pytester.makefile(".yaml", boxlite=files["yaml"])
    pytester.makepyfile("def test_nothing(): pass")


@pytest.mark.parametrize("files, message", [
    ({"ini": "[pytest]\nboxlite_memroy = 5\n"}, "*ini key 'boxlite_memroy' is unknown to pytest-boxlite*"),
    ({"ini": "[pytest]\nboxlite_cpus = many\n"}, "*ini boxlite_cpus = 'many': expected a number*"),
    ({"yaml": "profiles:\n  p: {cpu: 2}\n"}, "*boxlite.yaml: profile 'p': unknown key 'cpu'*"),
    ({"yaml": "profiles:\n  p: {memory_mib: 64}\n"},
     "*profile 'p': memory_mib=64 is invalid: use an integer in 128..65536*"),
    ({"yaml": "profile:\n  p: {}\n"}, "*boxlite.yaml: unknown key 'profile'*"),
    ({"ini": "[pytest]\nboxlite_network = lan\n"}, "*network='lan' is invalid: use 'internet'*"),
    ({"ini": "[pytest]\nboxlite_host_ports = pg\n"}, "*ini boxlite_host_ports = 'pg': expected port numbers*"),
    ({"args": "--boxlite-profile=nope"}, "*profile 'nope' is not defined in *boxlite.yaml*"),
    ({"ini": "[pytest]\nboxlite_python = system\n"}, "*python='system' is invalid: use one of host, image*"),
])
def test_unknown_keys_and_bad_values_are_usage_errors_naming_the_key(pytester, files, message):
    write_project(pytester, files)
    result = pytester.runpytest(*files.get("args", "").split())
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*pytest-boxlite: {message}"])


def test_a_bad_marker_argument_is_an_error_on_that_test_only(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.boxlite(memroy_mib=256)
        def test_typo():
            pass

        @pytest.mark.boxlite("positional")
        def test_positional():
            pass

        @pytest.mark.boxlite(scope="forever")
        def test_bad_scope():
            pass

        def test_local():
            pass
    """))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines_random([
        "*boxlite: boxlite marker: unknown key 'memroy_mib'*",
        "*boxlite marker takes keyword arguments only*",
        "*boxlite marker: scope='forever' is invalid: use one of test, module, session*",
    ])


@pytest.mark.parametrize("source, expected", [
    ({}, "on"),
    ({"args": "--boxlite-no-snapshots"}, "off"),
    ({"ini": "[pytest]\nboxlite_snapshots = false\n"}, "off"),
    ({"yaml": "profiles:\n  default: {snapshots: false}\n"}, "off"),
    ({"ini": "[pytest]\nboxlite_scope = module\n"}, None),  # only scope=test boxes are restored
])
def test_snapshots_setting(pytester, source, expected):
    write_project(pytester, source)
    result = pytester.runpytest("--boxlite", "--collect-only", *source.get("args", "").split())
    header = [line for line in result.outlines if line.startswith("boxlite:")][0]
    if expected is None:
        assert "snapshots" not in header
    else:
        assert f"snapshots {expected}," in header


@pytest.mark.parametrize("source, expected", [
    ({}, "host"),
    ({"args": "--boxlite-python=image"}, "image"),
    ({"ini": "[pytest]\nboxlite_python = image\n"}, "image"),
    ({"yaml": "profiles:\n  default: {python: image}\n"}, "image"),
    ({"args": "--boxlite-image=host"}, "host"),  # the host's interpreter in the default image's root
    ({"args": "--boxlite-python=image --boxlite-image=host"}, "image"),  # the host's root as it is (virtiofs)
])
def test_python_setting(pytester, source, expected):
    write_project(pytester, source)
    result = pytester.runpytest("--boxlite", "--collect-only", *source.get("args", "").split())
    header = [line for line in result.outlines if line.startswith("boxlite:")][0]
    assert header.endswith(f", python {expected}")


def test_help_documents_every_option_and_ini_key(pytester):
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    for option in ("--boxlite", "--boxlite-image", "--boxlite-profile", "--boxlite-engine", "--boxlite-timeout",
                   "--boxlite-keep", "--boxlite-config", "--boxlite-no-snapshots", "--boxlite-python"):
        assert f"{option} " in text or f"{option}=" in text or f"{option}\n" in text, option
    for key in ("boxlite_image", "boxlite_profile", "boxlite_engine", "boxlite_timeout", "boxlite_keep",
                "boxlite_config", "boxlite_cpus", "boxlite_memory_mib", "boxlite_network", "boxlite_scope",
                "boxlite_pool_size", "boxlite_snapshots", "boxlite_python"):
        assert f"  {key} " in text, key
    markers = pytester.runpytest("--markers").stdout.str()
    assert "@pytest.mark.boxlite(image=None, profile=None" in markers


def test_p_no_boxlite_disables_the_plugin(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, pytest

        @pytest.mark.boxlite
        def test_runs_on_the_host():
            assert os.path.exists(os.path.expanduser("~"))
    """))
    result = pytester.runpytest("-p", "no:boxlite", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=1)
    assert "boxlite:" not in result.stdout.str()


def test_boxlite_log_turns_the_runtimes_logging_on_and_a_bad_level_is_a_usage_error(pytester, monkeypatch):
    pytester.makepyfile("""
        import logging

        def test_vmm_logs_to_stderr():
            logger = logging.getLogger("vmm")
            assert logger.level == logging.INFO and any(type(h) is logging.StreamHandler for h in logger.handlers)
    """)
    monkeypatch.setenv("BOXLITE_LOG", "info")
    assert pytester.runpytest_subprocess().ret == pytest.ExitCode.OK
    monkeypatch.setenv("BOXLITE_LOG", "loud")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-boxlite: BOXLITE_LOG='loud' is not a log level: use one of debug*"])
