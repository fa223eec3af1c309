"""ONNX Runtime's intra-op threads follow the CPU affinity of the process (taskset, a container's
cpuset), not os.cpu_count(); LIVERKD_THREADS or a `threads` option overrides it."""

import json
import os
import subprocess
import sys

import pytest

from liverkd.deploy.backends.base import RunnerError, default_threads

CHILD = """
import json, os, sys
if {cpus!r} is not None:
    os.sched_setaffinity(0, {cpus!r})
from liverkd import models
from liverkd.deploy.backends.base import open_runner
from liverkd.deploy.bundle import Bundle

runner = open_runner(Bundle.load(models.path()), "onnxruntime", **{options!r})
print(json.dumps({{"threads": runner.session.get_session_options().intra_op_num_threads,
                  "affinity": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count()}}))
"""

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")


def session_threads(cpus=None, env=None, **options):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    code = CHILD.format(cpus=cpus, options=options)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_affinity
def test_threads_follow_a_restricted_affinity():
    one = {min(os.sched_getaffinity(0))}
    got = session_threads(cpus=one, env={"LIVERKD_THREADS": None})
    assert got["affinity"] == 1 and got["threads"] == 1
    if got["cpu_count"] > 1:  # what os.cpu_count() would have chosen
        assert got["threads"] < got["cpu_count"]


@needs_affinity
def test_threads_default_to_every_cpu_the_process_may_use():
    got = session_threads(env={"LIVERKD_THREADS": None})
    assert got["threads"] == got["affinity"] == len(os.sched_getaffinity(0))


@needs_affinity
def test_the_user_setting_wins_over_the_affinity():
    one = {min(os.sched_getaffinity(0))}
    assert session_threads(cpus=one, env={"LIVERKD_THREADS": "3"})["threads"] == 3
    assert session_threads(cpus=one, env={"LIVERKD_THREADS": "3"}, threads=2)["threads"] == 2


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_liverkd_threads_is_one_line(monkeypatch, value):
    monkeypatch.setenv("LIVERKD_THREADS", value)
    with pytest.raises(RunnerError, match=r"^LIVERKD_THREADS="):
        default_threads()
