import subprocess
import sys

import pytest

from calc import procs


def test_multiprocessing_pool():
    assert procs.squares_in_processes([1, 2, 3]) == [1, 4, 9]


def test_subprocess_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "calc.procs", "200"], capture_output=True, text=True, check=True)
    assert out.stdout == "big\n"


@pytest.mark.timeout(60)
def test_with_a_timeout():
    assert procs.main(["1", "2"]) == 0
