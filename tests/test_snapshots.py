"""Snapshot templates and the boxes restored from them, with real VMs (TCG here)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from vmm import AsyncRuntime, BoxError, BoxOptions, ConfigError, Runtime, snapshot
from vmm.volumes import directory_image

from .conftest import vm_processes

OPTIONS = BoxOptions(memory_mib=256, network=False)
# A warm command like the plugin's worker: started in the template, blocked on stdin, taken over by clones.
WARM = ("python3", "-c", "import os, random, sys; print('warm', flush=True); line = sys.stdin.readline(); "
                         "print(line.strip(), os.urandom(8).hex(), random.random(), flush=True)")


def warmup(box):
    execution = box.spawn(*WARM)
    assert next(iter(execution.stdout)) == b"warm\n"
    return execution, {"warmed": box.id}


@pytest.fixture(scope="module")
def template(runtime):
    return runtime.template(OPTIONS, warmup=warmup, key="tests.test_snapshots")


@pytest.fixture
def own_templates(tmp_path, runtime):
    """A runtime home whose templates are this test's own; its images are the session's (in a new home the
    default image would be built again: about a minute of mmdebstrap)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "images").symlink_to(runtime.home.images, target_is_directory=True)
    return home


@pytest.fixture
def clone(runtime, template):
    box = runtime.restore(template)
    yield box
    box.remove()


def guest_random(box) -> tuple[str, str]:
    bytes_ = box.exec("sh", "-c", "head -c 16 /dev/urandom | od -An -tx1").stdout.decode().split()
    python = box.exec("python3", "-c", "import uuid, random; print(uuid.uuid4(), random.random())").stdout.decode()
    return "".join(bytes_), python


def test_clones_have_distinct_entropy_and_identity(runtime, template):
    boxes = [runtime.restore(template) for _ in range(2)]
    try:
        first, second = (guest_random(b) for b in boxes)
        assert first[0] != second[0]  # kernel RNG
        assert first[1] != second[1]  # uuid.uuid4() and random in a new python
        names = [b.exec("hostname").stdout.strip() for b in boxes]
        assert names[0] != names[1] and names[0].decode() == f"box-{boxes[0].id[:8]}"
    finally:
        for box in boxes:
            box.remove()


def test_warm_command_taken_over_with_its_own_randomness(runtime, template):
    outputs = []
    for _ in range(2):
        box = runtime.restore(template)
        try:
            execution = box.warm_execution
            execution.stdin.write(b"hello\n")
            execution.stdin.close()
            outputs.append(execution.stdout.read().decode().split())
            assert execution.wait() == 0
        finally:
            box.remove()
    assert outputs[0][0] == outputs[1][0] == "hello"
    assert outputs[0][1] != outputs[1][1]  # os.urandom in a process started before the snapshot
    assert template.data == {"warmed": template.data["warmed"]}


def test_async_api_mirrors_the_sync_one(runtime, template):
    async def main() -> bytes:
        async with AsyncRuntime(runtime.home.root) as rt:
            same = await rt.template(OPTIONS, warmup=pytest.fail, key="tests.test_snapshots")
            assert same.directory == template.directory
            box = await rt.restore(same)
            try:
                await box.warm_execution.stdin.write(b"async\n")
                return await box.warm_execution.stdout.read()
            finally:
                await box.remove()

    assert asyncio.run(main()).startswith(b"async ")


def test_clock_is_the_hosts(clone):
    before = time.time()
    guest = float(clone.exec("date", "+%s.%N").stdout)
    after = time.time()
    assert before - 1 <= guest <= after + 1


STATE = "cat /root/file; grep -l '^sleep$' /proc/[0-9]*/comm; cat /proc/sys/kernel/sysrq"


def test_each_clone_starts_pristine(runtime, template):
    box = runtime.restore(template)
    try:
        pristine = box.exec("sh", "-c", STATE).stdout
        box.exec("sh", "-c", "echo dirty > /root/file; (sleep 1000 &); echo 0 > /proc/sys/kernel/sysrq")
        assert box.exec("sh", "-c", STATE).stdout != pristine  # the changes took
    finally:
        box.remove()
    box = runtime.restore(template)
    try:
        assert box.exec("sh", "-c", STATE).stdout == pristine
    finally:
        box.remove()


def test_templates_are_cached_and_keyed(runtime, template):
    again = runtime.template(OPTIONS, warmup=pytest.fail, key="tests.test_snapshots")  # found, not rebuilt
    assert again.directory == template.directory
    other = runtime.template(OPTIONS, key="another key")
    assert other.directory != template.directory


def test_a_different_image_digest_is_a_different_template(runtime, tmp_path):
    root = tmp_path / "root"
    for name in ("etc", "bin", "usr"):
        (root / name).mkdir(parents=True)
    (root / "etc" / "release").write_text("one\n")
    options = BoxOptions(image=f"dir:{root}", memory_mib=256, network=False)
    first = runtime.template(options)
    assert runtime.template(options, warmup=pytest.fail).directory == first.directory
    (root / "etc" / "release").write_text("two\n")  # the tree's digest changes
    second = runtime.template(options)
    assert second.directory != first.directory and second.image.digest != first.image.digest
    box = runtime.restore(second)
    try:  # the tree has no programs; copy_out uses the agent's own: the restored box has the new image
        box.copy_out("/etc/release", tmp_path / "release")
        assert (tmp_path / "release").read_text() == "two\n"
    finally:
        box.remove()


def test_damaged_template_is_rebuilt(own_templates):
    with Runtime(own_templates) as rt:
        calls = []

        def counting(box):
            calls.append(box.id)
            return None, len(calls)

        first = rt.template(OPTIONS, warmup=counting)
        first.state.write_bytes(b"garbage" + first.state.read_bytes()[7:])
        second = rt.template(OPTIONS, warmup=counting)
        assert len(calls) == 2 and second.data == 2
        os.truncate(second.ram, 4096)  # a RAM file cut short
        third = rt.template(OPTIONS, warmup=counting)
        assert len(calls) == 3
        box = rt.restore(third)
        assert box.exec("echo", "ok").stdout == b"ok\n"
        box.remove()


def test_restore_failure_discards_the_template(own_templates):
    with Runtime(own_templates) as rt:
        template = rt.template(OPTIONS)
        # Damaged after it was found and checked: qemu cannot load it.
        template.state.write_bytes(b"not a migration stream")
        with pytest.raises(BoxError, match="migration"):
            rt.restore(template)
        assert not template.directory.exists()  # the next template() call rebuilds it
        assert not vm_processes(str(own_templates))


CONCURRENT = """
import sys, time
from vmm import BoxOptions, Runtime
def warm(box):
    with open(sys.argv[1], "a") as f:
        f.write("built\\n")
    time.sleep(1)
    return None, None
with Runtime() as rt:
    print(rt.template(BoxOptions(memory_mib=256, network=False), warmup=warm, key="concurrent").directory)
"""


def test_concurrent_processes_build_one_template(tmp_path, own_templates, child_env):
    child_env["BOXLITE_HOME"] = str(own_templates)
    log = tmp_path / "builds"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(log)], env=child_env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    assert log.read_text() == "built\n"


def test_virtiofs_volumes_are_refused(runtime, tmp_path):
    with pytest.raises(ConfigError, match="image file"):
        runtime.template(BoxOptions(volumes=((str(tmp_path), "/data"),)))


def test_image_file_volumes(runtime, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hello.txt").write_text("hello")
    (tmp_path / "data" / "skip").mkdir()
    (tmp_path / "data" / "skip" / "secret").write_text("no")
    image = directory_image(tmp_path / "data", runtime.home.root, exclude=["skip"])
    assert directory_image(tmp_path / "data", runtime.home.root, exclude=["skip"]) == image  # cached
    template = runtime.template(BoxOptions(memory_mib=256, network=False, volumes=((str(image), "/data", "cow"),)))
    box = runtime.restore(template)
    try:
        result = box.exec("sh", "-c", "cat /data/hello.txt; ls -A /data/skip; echo more > /data/new; cat /data/new")
        assert result.stdout == b"hellomore\n"
    finally:
        box.remove()
    assert not (tmp_path / "data" / "new").exists()


def test_an_image_of_a_tree_that_holds_the_image_store_leaves_the_store_out(tmp_path):
    # Found in CI: a runtime home inside the project, reached through a symlink, was copied into its own image.
    (tmp_path / "project" / "store").mkdir(parents=True)
    (tmp_path / "project" / "code.py").write_text("x = 1\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "images").symlink_to(tmp_path / "project" / "store")
    image = directory_image(tmp_path / "project", tmp_path / "home", exclude=[".pytest_cache"])  # as the plugin

    def names(directory: str) -> set[str]:
        listing = subprocess.run(["debugfs", "-R", f"ls -p {directory}", str(image)], capture_output=True,
                                 text=True).stdout
        return {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}

    assert "code.py" in names("/") and names("/store/volumes") == {".", ".."}  # left empty, like any excluded dir


def test_layout_has_no_leftovers(template):
    assert sorted(p.name for p in template.directory.iterdir()) == ["ram", "state", "template.json"]
    assert not list(template.directory.parent.glob(f"{template.directory.name}.tmp-*"))



# -- boot snapshots: what Box.start() restores instead of booting ------------------------------------------


def test_start_restores_a_boot_snapshot(runtime):
    before = runtime.metrics()
    boxes = [runtime.create(OPTIONS, env={"N": str(i)}).start() for i in range(2)]
    try:
        after = runtime.metrics()
        built = after.templates_built - before.templates_built  # 1, or 0 if an earlier test saved it
        assert (after.restores - before.restores, after.boots - before.boots) == (2, built)
        # Options given with each exec are the box's own, not the snapshot's.
        assert [b.exec("sh", "-c", "echo $N").stdout for b in boxes] == [b"0\n", b"1\n"]
        first, second = (guest_random(b) for b in boxes)
        assert first[0] != second[0] and first[1] != second[1]
        restored_upper = upper_layer(boxes[1])  # the snapshot's warm-up (sh, python) wrote no file
        boxes[0].exec("sh", "-c", "echo dirty > /root/file")
        assert boxes[1].exec("cat", "/root/file").exit_code != 0
    finally:
        for box in boxes:
            box.remove()
    with runtime.create(OPTIONS, snapshots=False) as box:
        assert box.exec("echo", "booted").stdout == b"booted\n"
        assert upper_layer(box) == restored_upper
    assert runtime.metrics().boots == after.boots + 1


def test_the_first_start_says_it_saves_a_boot_snapshot(own_templates):
    said = []
    with Runtime(own_templates, progress=said.append) as rt, rt.create(OPTIONS):
        pass
    assert [m.split(" (")[0] for m in said if "snapshot" in m] == ["saving a boot snapshot", "boot snapshot saved"]


def upper_layer(box) -> bytes:
    """What the box's writes hold: the upper layer of its root overlay, as the agent sees it."""
    return box.spawn("/bin/busybox", "find", "/upperfs/upper", _root="agent").communicate()[0]


def test_a_boot_snapshot_that_fails_to_restore_is_discarded_and_the_box_boots(runtime, caplog):
    # A runtime of its own (on the session's home): what it remembers of the failure is not the session's.
    with Runtime(runtime.home.root) as rt:
        rt.create(OPTIONS).start().remove()  # saves the boot snapshot, or finds it
        template = rt.template(OPTIONS, key=snapshot.BOOT_KEY)  # the same template (built, so found)
        # Damaged in a way its checks miss (the checksum matches): qemu cannot load it.
        template.state.write_bytes(b"not a migration stream")
        meta = json.loads((template.directory / "template.json").read_text())
        meta["state_sha256"] = hashlib.sha256(b"not a migration stream").hexdigest()
        (template.directory / "template.json").write_text(json.dumps(meta))
        boots, built = rt.metrics().boots, rt.metrics().templates_built
        with caplog.at_level(logging.WARNING, logger="vmm.box"):
            with rt.create(OPTIONS) as box:
                assert box.exec("echo", "ok").stdout == b"ok\n"
                assert not template.directory.exists()
        assert "restoring its boot snapshot failed" in caplog.text
        assert rt.metrics().boots == boots + 1
        # Not saved and tried again by every later box of these options in this runtime: they boot.
        with rt.create(OPTIONS) as box:
            assert box.exec("echo", "ok").stdout == b"ok\n"
        assert rt.metrics().boots == boots + 2 and rt.metrics().templates_built == built


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs for the templates needs root")
def test_no_room_for_a_boot_snapshot_the_box_boots_and_a_template_says_why(own_templates, caplog):
    # Without the check the template's qemu died of SIGBUS when its RAM file hit the full disk, mid-build.
    templates = own_templates / "templates"
    templates.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "boxlite-test", str(templates)], check=True)
    try:
        with Runtime(own_templates) as rt, caplog.at_level(logging.WARNING, logger="vmm.snapshot"):
            for _ in range(2):
                with rt.create(OPTIONS) as box:
                    assert box.exec("echo", "ok").stdout == b"ok\n"
            assert rt.metrics().boots == 2 and rt.metrics().templates_built == 0
            assert caplog.text.count("MiB free") == 1  # said once; the second box booted without trying
            assert "boot instead" in caplog.text
            with pytest.raises(BoxError, match="free some space"):
                rt.template(OPTIONS)
            assert not list(templates.iterdir())
    finally:
        subprocess.run(["umount", str(templates)], check=True)
