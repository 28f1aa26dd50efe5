"""Commands in a real VM (QEMU, TCG here): output, exit status, stdin, kill, timeouts, concurrency."""

from __future__ import annotations

import hashlib
import signal
import threading

import pytest

from vmm import ExecError, ExecTimeout, OutputLimitExceeded

ALL_BYTES = bytes(range(256)) * 4


def test_stdout_and_stderr_are_exact_bytes(shared_box):
    script = "import sys; sys.stdout.buffer.write(bytes(range(256))*4); sys.stderr.buffer.write(b'\\x00err\\xff')"
    result = shared_box.exec("python3", "-c", script)
    assert result.exit_code == 0
    assert result.stdout == ALL_BYTES
    assert result.stderr == b"\x00err\xff"


def test_large_output_arrives_whole(shared_box):
    size = 12 << 20  # over 10 MiB: many flow-control windows
    result = shared_box.exec("sh", "-c", f"head -c {size} /dev/zero | tr '\\0' 'z'; echo done >&2")
    assert result.stdout == b"z" * size
    assert result.stderr == b"done\n"


def test_large_random_output_matches_its_checksum(shared_box):
    result = shared_box.exec("sh", "-c", "head -c 3000000 /dev/urandom > /tmp/r; cat /tmp/r; sha256sum /tmp/r >&2")
    assert hashlib.sha256(result.stdout).hexdigest() == result.stderr.split()[0].decode()


@pytest.mark.parametrize("code", [0, 1, 2, 42, 127, 255])
def test_exit_codes(shared_box, code):
    assert shared_box.exec("sh", "-c", f"exit {code}").exit_code == code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal(shared_box, sig):
    result = shared_box.exec("sh", "-c", f"kill -{int(sig)} $$")
    assert result.exit_code == -sig
    assert result.signal == sig


def test_stdin_streams_both_ways(shared_box):
    execution = shared_box.spawn("cat")
    reader = iter(execution.stdout)
    for i in range(5):
        line = f"line {i}\n".encode()
        execution.stdin.write(line)
        got = b""
        while len(got) < len(line):  # the echo comes back before stdin is closed: it streams
            got += next(reader)
        assert got == line
    execution.stdin.close()
    assert list(reader) == []
    assert execution.wait(timeout=30) == 0


def test_stdin_bytes_to_exec(shared_box):
    data = ALL_BYTES * 1000  # more than the stdin window: flow control both ways
    result = shared_box.exec("sha256sum", stdin=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_kill(shared_box):
    execution = shared_box.spawn("sleep", "600")
    execution.kill()
    assert execution.wait(timeout=30) == -signal.SIGKILL


def test_kill_with_a_chosen_signal_reaches_the_process(shared_box):
    execution = shared_box.spawn("sh", "-c",
                                 "trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.1; done")
    assert next(iter(execution.stdout)) == b"ready\n"
    execution.kill(signal.SIGUSR1)
    assert execution.wait(timeout=30) == 7
    assert execution.stdout.read() == b"got-usr1\n"


def test_timeout_kills_and_raises(shared_box):
    with pytest.raises(ExecTimeout, match="timed out after 1 s") as info:
        shared_box.exec("sh", "-c", "echo started; exec sleep 600", timeout=1)
    assert info.value.stdout == b"started\n"
    assert shared_box.exec("true").exit_code == 0  # the box goes on


def test_eight_concurrent_execs(shared_box):
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = shared_box.exec("sh", "-c", f"sleep 1; echo {i}; head -c 200000 /dev/zero | wc -c").stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: f"{i}\n200000\n".encode() for i in range(8)}


def test_env_cwd_and_user(shared_box):
    result = shared_box.exec("sh", "-c", 'echo "$BOX_LEVEL $EXEC_LEVEL $PATH"; pwd; id -u; id -g',
                             env={"EXEC_LEVEL": "exec"}, cwd="/tmp", user="nobody")
    env_line, cwd, uid, gid = result.stdout.decode().splitlines()
    assert env_line.startswith("box exec /usr/local/sbin")
    assert (cwd, uid, gid) == ("/tmp", "65534", "65534")
    assert shared_box.exec("id", "-u", user="1234:4321").stdout == b"1234\n"
    assert shared_box.exec("id", "-g", user="1234:4321").stdout == b"4321\n"


def test_unknown_command_is_a_clear_error(shared_box):
    with pytest.raises(ExecError, match="no-such-program"):
        shared_box.exec("no-such-program")
    with pytest.raises(ExecError, match=r"exec\('sh', '-c'"):
        shared_box.exec("echo hello")


def test_unknown_user_is_a_clear_error(shared_box):
    with pytest.raises(ExecError, match="no-such-user"):
        shared_box.exec("true", user="no-such-user")


def test_flood_past_max_output_is_an_error_and_the_box_goes_on(shared_box):
    with pytest.raises(OutputLimitExceeded, match="more than 1048576 bytes"):
        shared_box.exec("yes", max_output=1 << 20, timeout=60)
    assert shared_box.exec("echo", "ok").stdout == b"ok\n"


def test_copy_in_and_out(shared_box, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "data.bin").write_bytes(ALL_BYTES)
    (src / "script.sh").write_text("echo hi\n")
    (src / "script.sh").chmod(0o755)
    (src / "link").symlink_to("sub/data.bin")
    shared_box.copy_in(src, "/tmp/copied/tree")
    assert shared_box.exec("sh", "/tmp/copied/tree/script.sh").stdout == b"hi\n"
    assert shared_box.exec("cat", "/tmp/copied/tree/link").stdout == ALL_BYTES
    out = tmp_path / "back"
    shared_box.copy_out("/tmp/copied/tree", out)
    assert (out / "sub" / "data.bin").read_bytes() == ALL_BYTES
    assert (out / "link").readlink().as_posix() == "sub/data.bin"
    assert (out / "script.sh").stat().st_mode & 0o111
    shared_box.copy_in(src / "script.sh", "/tmp/single.sh")
    assert shared_box.exec("cat", "/tmp/single.sh").stdout == b"echo hi\n"


def test_copy_out_of_a_missing_path_is_an_error(shared_box, tmp_path):
    with pytest.raises(ExecError, match="/no/such/file"):
        shared_box.copy_out("/no/such/file", tmp_path / "x")


def test_metrics(shared_box, runtime):
    shared_box.exec("true")
    metrics = shared_box.metrics()
    assert 0 < metrics.memory_used_kib < metrics.memory_total_kib <= 512 * 1024
    assert metrics.exec_count >= 1 and metrics.uptime_s > 0 and metrics.host_rss_bytes > 0
    rt = runtime.metrics()
    assert rt.active_boxes >= 1 and rt.exec_calls >= metrics.exec_count and rt.boxes_created >= 1
