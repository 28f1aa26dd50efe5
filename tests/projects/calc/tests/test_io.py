import logging
import os
import threading

import pytest

from calc import logs, net, numeric


def test_loopback_echo():
    port = net.echo_server()
    assert net.shout(port, "hello") == "HELLO"


def test_signal_handler():
    fired = threading.Event()
    logs.on_alarm(fired.set)
    assert fired.wait(5)


def test_tmp_path(tmp_path):
    (tmp_path / "numbers").write_text("1 2 3")
    assert numeric.mean([int(v) for v in (tmp_path / "numbers").read_text().split()]) == 2.0


def test_capsys(capsys):
    print("out")
    assert capsys.readouterr().out == "out\n"


def test_caplog(caplog):
    with caplog.at_level(logging.WARNING):
        logs.checked(11)
    assert "value 11 is large" in caplog.text


def test_normalize():
    pytest.importorskip("numpy")
    assert numeric.normalize([1, 2, 3]) == [0.0, 0.5, 1.0]


@pytest.mark.skipif(os.name == "posix", reason="not on posix")
def test_windows_only():
    pass
