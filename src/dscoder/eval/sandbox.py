"""Running untrusted programs: model completions under test, and RL rewards.

What runs (``Sandbox.run(source, call)``):

``call = {"tests": TESTS, "check": "check", "entry_point": NAME}`` (HumanEval style)
  the candidate process runs ``source``; the checker runs ``TESTS`` (which defines ``check``) and then
  ``check(<NAME>)``. Every call of a candidate function crosses a pipe as plain data (see below).
``"prelude": CODE`` (optional, with ``"tests"``)
  trusted code of the task (HumanEval's prompt) the checker runs in the tests' scope first: the names it defines
  (helpers such as ``poly`` or ``encode_cyclic`` that the tests call, its imports) are the checker's own, never the
  candidate's, except the entry point.
``call = {"tests": TESTS}`` (MBPP style; an optional ``"entry_point"``)
  ``TESTS`` is statements (setup code and ``assert f(...) == ...`` lines) run by the checker; each name they use
  but do not define, and that is not a built-in (the entry point may be), is the candidate's top-level object of
  that name: a function is called through the pipe, a module is the checker's own import of that (standard-library)
  module, a plain value is copied.
``"data": VALUE``, ``"collect": NAME`` (optional, with ``"tests"``)
  ``VALUE`` (plain data) is the tests' ``DATA``; the tests may call ``time_limit(seconds)`` to give each later call
  of a candidate function that long (verdict ``timeout`` past it); the value of ``NAME`` in the tests' scope when
  they end (passed or not) comes back as ``RunResult.collected``.
``call = {"stdio": [[INPUT, OUTPUT], ...], "test_timeout": S}`` (LiveCodeBench's stdin/stdout problems)
  ``source`` is compiled once and run as a program once per test, in a fresh fork, with ``INPUT`` on its stdin; its
  stdout comes back to the checker, which compares it with ``OUTPUT`` as LiveCodeBench's harness does (stripped
  lines, equal as text or as decimals); the first failing test decides. ``"warm"``: standard-library modules to
  import once before the tests.
``"timeout_s": S`` (optional, any Python call): this run's wall clock instead of ``Limits.timeout_s``.
``call = None``
  run ``source`` to its end; it passes if it returns normally (no checks: the program judges itself).
``call = {"file": NAME, "command": LINE, "tools": {name: host path}}`` (MultiPL-E, any language)
  the program is written to ``NAME`` in the working directory and ``sh -c LINE`` runs there; ``{name}`` in the
  line is replaced by the tool's path. It passes when the command exits 0 (as MultiPL-E's own harness judges it).

The checker split (the code inside the sandbox is ``sandbox_driver.py``): the run's first process forks the
candidate process *before* it reads the tests or the per-run nonce. The candidate process runs the candidate's code
and serves calls: the checker sends ``(name, args, kwargs)`` and gets back the result or the exception, encoded as
plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset; size and depth bounded;
decoded by a strict decoder, never pickle or eval; a subclass of these crosses as its plain value, without its
methods). Anything else the candidate returns, or a decoding error, fails the run whatever the tests do with it; a
candidate exception is raised in the checker as the built-in exception of that name (other types, and
StopIteration, which would end a test's ``map`` loop unseen, as ``CandidateError``). The verdict is the nonce, written
by the checker on its own pipe to the host; the candidate's
stdout and stderr are separate capped files, so nothing the candidate prints can pass a run.

Two isolation levels, chosen automatically (``Sandbox(isolation=...)`` forces one):

``namespaces`` (root on Linux 5.12 or later; CI and most containers): new network, mount, PID, IPC and UTS
  namespaces per run, forked by the worker slot's launcher (a process made once per slot, in the slot's cgroup, so
  that a run starts without an interpreter start or a cgroup move); the whole filesystem view read-only
  (``mount_setattr`` recursive on ``/``) with fresh tmpfs on ``/tmp`` (the working directory), ``/var/tmp`` and
  ``/dev/shm``, and empty read-only tmpfs over every top-level directory but the system's (``/home``, ``/root``,
  ``/run``, ``/opt``, a checkout, …: host unix sockets, users' files and projects live there), over ``/dev/pts`` (no
  host ptys) and over the site-packages of the interpreters and of the harness's environment; ``/dev/null`` over the
  files at the top of ``/``; the interpreter (and command-mode tools) re-exposed read-only at their own paths; a
  fresh ``/proc``. The candidate runs as uid 61000 + n, the checker as uid 62000 + n, n the slot's number (reserved
  machine-wide, so no two sandboxes share a uid), both without groups, capabilities or new privileges; the checker
  is not dumpable, so the candidate cannot read or trace it. A cgroup per worker slot (v1 ``memory``+``pids`` or v2
  with both controllers, where writable; ``cpu`` too where there) caps the memory (swap included), the number of
  tasks and (with ``cpu``) the CPU time to one CPU of the whole run; an OOM kill is reported as "memory limit".
  Where no cgroup is writable, only the per-process limits below hold.
``process`` (anything else): the same checker split and limits in a scratch directory, without namespaces, uids or
  cgroups; the program can read and write what the user can and reach the network (and, running as the same user
  as the harness, could forge a verdict through ``/proc``). Use it only for trusted code.

Both levels: a seccomp filter on the candidate (x86-64 and aarch64) refuses namespaces (``unshare``, ``setns``,
``clone`` with a ``CLONE_NEW*`` flag; ``clone3`` answers ENOSYS so libc falls back to ``clone``), mounts, keyrings,
``bpf``, ``ptrace``, ``process_vm_*``, ``perf_event_open``, ``userfaultfd``, ``io_uring``, Linux AIO (a machine-wide
pool), sockets of any family but AF_INET and AF_INET6 (unix, vsock, netlink, ...) and datagram socketpairs, and
kills a process that calls in another ABI; per-process limits (address space, CPU time, processes of its uid, file
size, open files, no core files, no real-time or raised priority); a wall-clock timeout enforced from outside
(killing the namespace's first process kills everything in it); output capped; an environment of ``PATH``, ``HOME``,
``LANG`` only.
"""

from __future__ import annotations

import functools
import glob
import os
import queue
import secrets
import select
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dscoder.errors import DscoderError
from dscoder.eval import sandbox_driver as driver

_UID_BASE = 61000  # candidate uids: 61000 + the slot's number
_CHECKER_UID_BASE = 62000  # checker uids: 62000 + the slot's number
# slot numbers are reserved machine-wide (a lock file each, held while the Sandbox lives), so two sandboxes (two
# GRPO ranks, an eval beside a training run) never share a uid: runs of one uid share its process count, and a
# hostile run could make another's fork fail and its reward drop
_SLOT_NUMBERS = 1000
_SLOT_LOCKS = ("/run/lock", "/dev/shm", tempfile.gettempdir())
# A run sees the system's top-level directories (read-only); every other one (/home, /root, /run, /mnt, /opt, /srv,
# a project checkout such as /work, ...) and HIDDEN are behind an empty read-only tmpfs (host sockets, users' files,
# datasets); /tmp, /var/tmp and /dev/shm get a fresh writable tmpfs each; SITE_PACKAGES of the visible interpreters
# are masked too (runs use -S: the standard library only, and no installed benchmark data with its answers).
SYSTEM = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "sys", "tmp", "var")
HIDDEN = ("/run", "/var/run", "/var/lock", "/dev/pts")  # /dev/pts: opening /dev/ptmx would make a host pty
SCRATCH = {"/tmp": "64m", "/var/tmp": "16m", "/dev/shm": "16m"}
SITE_PACKAGES = ("lib/python3*/site-packages", "lib/python3*/dist-packages", "lib/python3/dist-packages",
                 "lib64/python3*/site-packages")

CPU_PERIOD_US = 100_000  # with cgroups, a run gets one CPU's time: quota = period
_DRIVER = (Path(__file__).with_name("sandbox_driver.py")).read_text(encoding="utf-8")


@dataclass
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024  # per process (address space) and, with cgroups, for the whole run
    max_processes: int = 64
    file_mb: int = 16
    open_files: int = 256
    output_bytes: int = 64 * 1024


VERDICTS = ("passed", "failed", "timeout", "runtime_error", "compile_error", "sandbox_error")


@dataclass
class RunResult:
    status: str  # passed | failed | timeout
    reason: str = ""  # why it did not pass, e.g. "memory limit (...)", "AssertionError at tests line 3: assert ..."
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    # finer than status: failed splits into failed (the tests said no, or the candidate broke the rules),
    # runtime_error (it raised, crashed or hit a limit) and sandbox_error (the sandbox could not run it); the
    # sandbox always sets it ("" only in a failed RunResult made elsewhere without one)
    verdict: str = ""
    collected: object = None  # the value of the call's "collect" name in the tests' scope (plain data), if any

    def __post_init__(self):
        if not self.verdict and self.status in ("passed", "timeout"):
            self.verdict = self.status

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class Sandbox:
    limits: Limits = field(default_factory=Limits)
    isolation: str = "auto"  # auto | namespaces | process
    workers: int = 0  # 0: one per CPU core

    def __post_init__(self):
        if self.isolation == "auto":
            self.isolation = "namespaces" if namespaces_available() else "process"
        elif self.isolation == "namespaces" and not namespaces_available():
            raise DscoderError("sandbox isolation 'namespaces' needs root on Linux 5.12 or later")
        elif self.isolation not in ("namespaces", "process"):
            raise DscoderError(f"unknown sandbox isolation '{self.isolation}' (auto, namespaces or process)")
        self.workers = self.workers or os.cpu_count() or 1
        count = max(self.workers, 1) * 2
        # (with many sandboxes on one machine, as few as one slot per worker)
        self._numbers, self._locks = _reserve_slots(count, max(self.workers, 1)) \
            if self.isolation == "namespaces" else (list(range(count)), [])
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(len(self._numbers)):
            self._slots.put(slot)
        self._cgroups = _Cgroups.create(self.limits, len(self._numbers)) if self.isolation == "namespaces" else None
        self._launchers: dict[int, _Launcher] = {}
        self._hide = _hidden_dirs() if self.isolation == "namespaces" else []
        self._mask = _site_packages() if self.isolation == "namespaces" else []
        self._files = _top_files() if self.isolation == "namespaces" else []
        weakref.finalize(self, _shutdown, self._launchers, self._cgroups.all_dirs() if self._cgroups else [],
                         self._locks)

    @property
    def cgroups(self) -> str:
        """Which whole-run limit is in force: 'v1', 'v2', or 'none' (per-process limits only)."""
        return self._cgroups.version if self._cgroups else "none"

    # ----- one program ------------------------------------------------------------------------------------------
    def run(self, program: str, call: dict | None = None) -> RunResult:
        """Run ``program`` with ``call`` as described in the module's docstring."""
        slot = self._slots.get()
        try:
            return self._run(program, call, slot)
        finally:
            self._slots.put(slot)

    def run_many(self, programs: list[tuple[str, dict | None]]) -> Iterator[RunResult]:
        """Results in the order of ``programs``, each as soon as it (and those before it) finished."""
        with ThreadPoolExecutor(self.workers) as pool:
            yield from pool.map(lambda p: self.run(*p), programs)

    def _job(self, nonce: str, program: str, call: dict | None) -> tuple[dict, list[str]]:
        if not call:
            return {"nonce": nonce, "program": program}, []
        if "command" in call:
            return self._command_job(nonce, program, call)
        if "tests" not in call:
            if "stdio" not in call:
                raise DscoderError("sandbox: a Python run needs call = {'tests': ...} (and 'check', 'entry_point' "
                                   "for HumanEval style), {'stdio': [[input, output], ...]} or None")
        if call.get("check") and not call.get("entry_point"):
            raise DscoderError("sandbox: 'check' needs an 'entry_point'")
        if "stdio" in call:
            tests = [[str(i), str(o)] for i, o in call["stdio"]]
            job = {"nonce": nonce, "program": program, "stdio": tests, "warm": [str(m) for m in call.get("warm", ())]}
            if call.get("test_timeout"):
                job["test_timeout"] = float(call["test_timeout"])
            return job, []
        job = {"nonce": nonce, "program": program, "tests": str(call["tests"])}
        if call.get("data") is not None:
            job["data"] = call["data"]
        if call.get("collect"):
            job["collect"] = str(call["collect"])
        if call.get("entry_point"):
            job["entry_point"] = str(call["entry_point"])
        if call.get("check"):
            job["check"] = str(call["check"])
        if call.get("prelude"):
            job["prelude"] = str(call["prelude"])
        return job, []

    def _command_job(self, nonce: str, program: str, call: dict) -> tuple[dict, list[str]]:
        """Tools outside world-readable directories (e.g. a rustup toolchain under /root) are re-exposed read-only
        at their own path inside the namespace."""
        name, command = call["file"], call["command"]
        if "/" in name or not name.strip() or "\n" in name or "\n" in command:
            raise DscoderError(f"sandbox command: bad file name {name!r} or a command with a newline")
        expose = []
        for tool, host in (call.get("tools") or {}).items():
            path = Path(host).resolve()
            if self.isolation == "namespaces" and (not _world_reachable(path) or self._hidden(path)):
                expose.append(str(path.parent.parent))  # bin/TOOL → the toolchain's prefix
            command = command.replace("{" + tool + "}", _quote(str(path)))
        return {"nonce": nonce, "program": program, "file": name, "command": command}, expose

    def _config(self, slot: int, expose: list[str], timeout: float) -> dict:
        lim = self.limits
        cfg = {"isolation": self.isolation, "memory": lim.memory_mb << 20,
               "cpu": int(timeout) + 2, "fsize": lim.file_mb << 20, "nofile": lim.open_files,
               "nproc": lim.max_processes, "uid": _UID_BASE + self._numbers[slot],
               "checker_uid": _CHECKER_UID_BASE + self._numbers[slot]}
        if self.isolation == "namespaces":
            prefix = Path(sys.base_prefix).resolve()  # the interpreter's, if the run's uids could not reach it
            if self._hidden(prefix) or _private_ancestor(prefix):
                expose = [str(prefix), *expose]
            hide = list(self._hide)
            for path in expose:  # a private directory above an exposed path is hidden too (and the path re-exposed)
                top = _private_ancestor(Path(path))
                if top and not _under(top, hide):
                    hide.append(top)
            mask = [m for m in self._mask if not _under(m, [*hide, *SCRATCH]) or _under(m, expose)]
            cfg.update(expose=expose, hide=hide, mask=mask, mask_files=self._files,
                       scratch=[[p, s] for p, s in SCRATCH.items() if os.path.isdir(p)])
        return cfg

    def _run(self, program: str, call: dict | None, slot: int) -> RunResult:
        nonce = secrets.token_hex(16)
        job, expose = self._job(nonce, program, call)
        timeout = float((call or {}).get("timeout_s") or self.limits.timeout_s)
        private = Path(tempfile.mkdtemp(prefix="dscoder-run-"))  # root-only: output files, process-mode scratch
        os.chmod(private, 0o700)
        out_path, err_path = private / "stdout", private / "stderr"
        verdict_path = private / "verdict"  # a file, not a pipe: a collected value may be larger than a pipe holds
        oom_before = self._cgroups.oom_kills(slot) if self._cgroups else 0
        start = time.perf_counter()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                if self.isolation == "namespaces":
                    try:
                        timed_out, returncode, verdict = self._launch(slot, self._config(slot, expose, timeout),
                                                                      _frame(job), out, err, verdict_path, timeout)
                    except _LauncherGone:  # once more, with a new launcher
                        try:
                            timed_out, returncode, verdict = self._launch(slot, self._config(slot, expose, timeout),
                                                                          _frame(job), out, err, verdict_path,
                                                                          timeout)
                        except _LauncherGone:
                            timed_out, returncode = False, None
                            verdict = ("error", "sandbox error: the slot's launcher died before it started the run")
                    _wait_uid_gone(_UID_BASE + self._numbers[slot])  # the kernel tears the PID namespace down
                else:
                    scratch = private / "scratch"
                    scratch.mkdir()
                    timed_out, returncode, verdict = self._spawn(self._config(slot, expose, timeout), _frame(job), out,
                                                                 err, str(scratch), verdict_path, timeout)
            seconds = time.perf_counter() - start
            stdout = _read_capped(out_path, self.limits.output_bytes)
            stderr = _read_capped(err_path, self.limits.output_bytes)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        oom = self._cgroups is not None and self._cgroups.oom_kills(slot) > oom_before
        collected = verdict[-1] if type(verdict) is tuple and len(verdict) in (3, 4) and verdict[0] in ("pass", "fail") \
            and (verdict[0] == "pass") == (len(verdict) == 3) else None
        if collected is not None:
            verdict = verdict[:-1]
        if timed_out:
            reason = f"timed out after {timeout:g} s"
            return RunResult("timeout", reason + (" (memory limit reached)" if oom else ""), None, stdout, stderr,
                             seconds)
        if verdict == ("pass", nonce):
            return RunResult("passed", "", returncode, stdout, stderr, seconds, collected=collected)
        if oom:
            reason, kind = f"memory limit ({self.limits.memory_mb} MiB for the whole run)", "runtime_error"
        elif type(verdict) is tuple and len(verdict) == 3 and verdict[0] == "fail" and verdict[2] in VERDICTS:
            reason, kind = str(verdict[1]), verdict[2]
        elif type(verdict) is tuple and len(verdict) == 2 and verdict[0] == "error":
            reason, kind = str(verdict[1]), "sandbox_error"
        else:  # killed (a limit) before the checker could say anything
            reason, kind = _reason(returncode, stderr), "runtime_error"
        return RunResult("failed", reason, returncode, stdout, stderr, seconds, kind, collected)

    def _spawn(self, cfg: dict, job: bytes, out, err, cwd: str, verdict_path: Path,
               timeout: float) -> tuple[bool, int | None, object]:
        """process isolation: the driver as a child of this process, in a session of its own."""
        verdict_w = os.open(verdict_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            cfg["verdict_fd"] = verdict_w
            proc = subprocess.Popen([_python(), "-I", "-S", "-c", _DRIVER], stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, cwd=cwd, env=self._env(cwd), start_new_session=True,
                                    pass_fds=(verdict_w,))
            os.close(verdict_w)
            verdict_w = -1
            timed_out = False
            try:
                proc.communicate(_frame(cfg) + job, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:  # the driver died before reading its spec
                proc.wait(timeout=timeout)
            finally:
                _kill_group(proc)
            return timed_out, proc.returncode, _read_verdict(verdict_path)
        finally:
            if verdict_w >= 0:
                os.close(verdict_w)

    def _launch(self, slot: int, cfg: dict, job: bytes, out, err, verdict_path: Path,
                timeout: float) -> tuple[bool, int | None, object]:
        """namespaces: the slot's launcher forks the run; it reports the run's first process (its pid here) and,
        once that has ended, its exit code."""
        job_r, job_w = os.pipe()
        verdict_w = os.open(verdict_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        status_r, status_w = os.pipe()
        mine = [job_w, status_r]
        try:
            fds = [job_r, out.fileno(), err.fileno(), verdict_w, status_w]
            for attempt in (0, 1):
                launcher = self._launchers.get(slot)
                if launcher is None or launcher.poll() is not None:
                    launcher = self._launchers[slot] = _Launcher(self, slot)
                try:
                    socket.send_fds(launcher.sock, [driver.encode(cfg)], fds)
                    break
                except OSError:
                    launcher.kill()
                    if attempt:
                        raise DscoderError("sandbox: the slot's launcher cannot be started") from None
            for fd in (job_r, verdict_w, status_w):
                os.close(fd)
            os.set_blocking(job_w, False)
            poller = select.poll()
            poller.register(status_r, select.POLLIN)
            poller.register(job_w, select.POLLOUT)
            deadline = time.monotonic() + timeout
            lines, status, pid, timed_out = [], b"", None, False
            while True:
                left = deadline - time.monotonic()
                if left <= 0 and not timed_out:
                    timed_out = True
                    if pid is not None and pid > 0:
                        _kill(pid)
                    else:
                        launcher.kill()
                    left, deadline = 5.0, time.monotonic() + 5.0
                elif left <= 0:
                    break
                events = dict(poller.poll(left * 1000))
                if job and events.get(job_w):
                    try:
                        job = job[os.write(job_w, job):]
                    except OSError:  # the checker is gone
                        job = b""
                    if not job:
                        poller.unregister(job_w)
                        os.close(job_w)
                        mine.remove(job_w)
                if events.get(status_r):
                    chunk = os.read(status_r, 64)
                    if not chunk:
                        break
                    status += chunk
                    lines = status.split(b"\n")[:-1]
                    if lines and pid is None:
                        pid = int(lines[0])
                        if timed_out and pid > 0:
                            _kill(pid)
            if pid is None and not timed_out:  # the launcher died before it started the run
                launcher.kill()
                raise _LauncherGone
            returncode = int(lines[1]) if len(lines) > 1 else None
            return timed_out, returncode, _read_verdict(verdict_path)
        finally:
            for fd in mine:
                os.close(fd)

    def _hidden(self, path: Path) -> bool:
        return _under(str(path), [*self._hide, *SCRATCH])

    def _env(self, home: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": "/tmp/work" if self.isolation == "namespaces" else home,
                "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


class _Cgroups:
    """One cgroup per worker slot, made once per Sandbox and removed when it is collected: memory (swap included)
    and task limits over everything a run starts."""

    def __init__(self, version: str, dirs: list[list[Path]], oom_file: str, parents: list[Path]):
        self.version, self.dirs, self.oom_file, self.parents = version, dirs, oom_file, parents

    def all_dirs(self) -> list[Path]:
        return [*(d for slot in self.dirs for d in slot), *self.parents]

    @classmethod
    def create(cls, limits: Limits, slots: int) -> _Cgroups | None:
        name = f"dscoder-{os.getpid()}-{secrets.token_hex(3)}"
        memory, swap = str(limits.memory_mb << 20), str(limits.memory_mb << 20)
        tasks = str(limits.max_processes + 8)  # + the driver, the checker and their threads
        v1 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/pids")
        cpu = Path("/sys/fs/cgroup/cpu")  # optional: one CPU's time per run (else setsid'd spinners starve the host)
        _remove_stale_cgroups([*v1, cpu, Path("/sys/fs/cgroup")])
        made: list[Path] = []
        try:
            if all((root / "cgroup.procs").exists() for root in v1):
                dirs = []
                for slot in range(slots):
                    mem, pids = (root / name / f"slot{slot}" for root in v1)
                    for d in (mem, pids):
                        d.mkdir(parents=True)
                        made.append(d)
                    (mem / "memory.limit_in_bytes").write_text(memory)
                    if (mem / "memory.memsw.limit_in_bytes").exists():
                        (mem / "memory.memsw.limit_in_bytes").write_text(swap)
                    (pids / "pids.max").write_text(tasks)
                    dirs.append([mem, pids, *_cpu_v1(cpu / name / f"slot{slot}", made)])
                _write(cpu / name / "cpu.shares", str(min(1024 * -(-slots // 2), 262144)))  # see _write
                return cls("v1", dirs, "memory.oom_control", [root / name for root in (*v1, cpu)])
            root = Path("/sys/fs/cgroup")
            controllers = (root / "cgroup.controllers").read_text().split() \
                if (root / "cgroup.controllers").exists() else []
            if "memory" in controllers and "pids" in controllers:
                wanted = "+memory +pids" + (" +cpu" if "cpu" in controllers else "")
                (root / "cgroup.subtree_control").write_text(wanted)
                parent = root / name
                parent.mkdir()
                made.append(parent)
                (parent / "cgroup.subtree_control").write_text(wanted)
                _write(parent / "cpu.weight", str(min(100 * -(-slots // 2), 10000)))  # see _write
                dirs = []
                for slot in range(slots):
                    d = parent / f"slot{slot}"
                    d.mkdir()
                    made.insert(0, d)
                    (d / "memory.max").write_text(memory)
                    if (d / "memory.swap.max").exists():
                        (d / "memory.swap.max").write_text("0")
                    (d / "pids.max").write_text(tasks)
                    if (d / "cpu.max").exists():
                        (d / "cpu.max").write_text(f"{CPU_PERIOD_US} {CPU_PERIOD_US}")
                    dirs.append([d])
                return cls("v2", dirs, "memory.events", [parent])
        except OSError:
            _remove_cgroups(made)
        return None

    def procs(self, slot: int) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs[slot]]

    def oom_kills(self, slot: int) -> int:
        try:
            for line in (self.dirs[slot][0] / self.oom_file).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


def _write(path: Path, value: str) -> None:
    """Write a cgroup setting if the file is there. The slots' parent's CPU weight: one default weight per worker
    (half the slots: the runs at once), so that under contention the sandbox as a whole gets the share its running
    launchers had in sessions of their own (one default weight each) rather than one."""
    try:
        if path.exists():
            path.write_text(value)
    except OSError:
        pass


def _cpu_v1(d: Path, made: list[Path]) -> list[Path]:
    """A slot's cgroup in the v1 ``cpu`` hierarchy, capped at one CPU; none where that hierarchy is not writable
    (the memory and task limits hold without it)."""
    if not (d.parent.parent / "cgroup.procs").exists():
        return []
    try:
        d.mkdir(parents=True)
        made.append(d)
        (d / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (d / "cpu.cfs_quota_us").write_text(str(CPU_PERIOD_US))
        return [d]
    except OSError:
        _remove_cgroups([d, d.parent] if d.exists() else [d.parent])
        return []


class _LauncherGone(Exception):
    pass


class _Launcher:
    """A slot's launcher process (see the driver's ``launcher``), talked to over a unix socket pair."""

    def __init__(self, sandbox: Sandbox, slot: int):
        python = _python()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            procs = sandbox._cgroups.procs(slot) if sandbox._cgroups else []
            self.proc = subprocess.Popen([python, "-I", "-S", "-c", _DRIVER, "launcher", str(theirs.fileno()), *procs],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, cwd="/", env=sandbox._env("/tmp/work"),
                                         start_new_session=True, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.sock.close()
        _kill(self.proc.pid)
        self.proc.wait()


def _shutdown(launchers: dict[int, _Launcher], cgroup_dirs: list[Path], locks: list[int]) -> None:
    for launcher in launchers.values():
        launcher.kill()
    _remove_cgroups(cgroup_dirs)
    for fd in locks:
        os.close(fd)


def _reserve_slots(count: int, least: int) -> tuple[list[int], list[int]]:
    """Up to ``count`` (at least ``least``) slot numbers no other Sandbox on this machine holds, and the locked files
    that hold them (the kernel drops the locks of a process that dies)."""
    import fcntl

    for parent in _SLOT_LOCKS:
        folder = os.path.join(parent, "dscoder-sandbox-slots")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            st = os.lstat(folder)
            if st.st_uid == os.geteuid() and not st.st_mode & 0o022 and os.path.isdir(folder) \
                    and not os.path.islink(folder):
                break
        except OSError:
            continue
    else:
        raise DscoderError("sandbox: no private directory for its slot locks (tried " + ", ".join(_SLOT_LOCKS) + ")")
    numbers, locks = [], []
    for n in range(_SLOT_NUMBERS):
        fd = os.open(os.path.join(folder, f"slot{n}"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        numbers.append(n)
        locks.append(fd)
        if len(numbers) == count:
            break
    if len(numbers) >= least:
        return numbers, locks
    for fd in locks:
        os.close(fd)
    raise DscoderError(f"sandbox: {len(numbers)} of the machine's {_SLOT_NUMBERS} worker slots are free (other "
                       f"sandboxes hold the rest), fewer than the {least} workers asked for")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_stale_cgroups(roots: list[Path]) -> None:
    """Remove the (empty) cgroups of sandboxes whose process is gone (killed before its finalizer ran)."""
    for root in roots:
        try:
            for d in root.glob("dscoder-*"):
                pid = d.name.split("-")[1]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    _remove_cgroups([*(p for p in d.iterdir() if p.is_dir()), d])
        except OSError:
            pass


def _remove_cgroups(dirs: list[Path]) -> None:
    for d in sorted(dirs, key=lambda p: -len(p.parts)):  # children first
        try:
            d.rmdir()
        except OSError:
            pass


def _frame(value) -> bytes:
    data = driver.encode(value)
    return len(data).to_bytes(8, "little") + data


def _read_verdict(path: Path):
    try:
        with open(path, "rb") as f:
            data = f.read(driver.MAX_FRAME + 8)
    except OSError:
        return None
    try:
        n = int.from_bytes(data[:8], "little")
        return driver.decode(data[8:8 + n]) if len(data) >= 8 + n else None
    except (ValueError, IndexError, TypeError, UnicodeDecodeError, OverflowError):
        return None


@functools.cache
def namespaces_available() -> bool:
    """Whether this process can give each run its namespaces and read-only view (root on Linux 5.12 or later)."""
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    try:
        probe = subprocess.run([_python(), "-I", "-S", "-c", _DRIVER, "probe"], capture_output=True, timeout=30)
        return probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _python() -> str:
    """The base interpreter (a venv's python is a link to it; runs use -I -S and need nothing of the venv)."""
    return str(Path(getattr(sys, "_base_executable", sys.executable)).resolve())


def _world_reachable(path: Path) -> bool:
    """Whether an unprivileged uid can reach ``path`` (every directory above it searchable by others) and read or
    execute it."""
    try:
        if not path.stat().st_mode & 0o005:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in path.parents)
    except OSError:
        return False


def _under(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _hidden_dirs() -> list[str]:
    tops = [f"/{name}" for name in sorted(os.listdir("/")) if name not in SYSTEM]
    return [p for p in dict.fromkeys((*tops, *HIDDEN)) if os.path.isdir(p) and not os.path.islink(p)]


def _top_files() -> list[str]:
    """What sits at the top of / and is neither a directory nor a link (a container's metadata, a user's notes, a
    socket): masked like the hidden directories."""
    found = []
    for entry in os.scandir("/"):
        try:
            if not entry.is_symlink() and not entry.is_dir(follow_symlinks=False):
                found.append(entry.path)
        except OSError:
            continue
    return sorted(found)


def _site_packages() -> list[str]:
    """The site-packages of the base interpreter, /usr and /usr/local, and those this process imports from (its
    virtual environment's, wherever it lives: one under /usr/local or /var would otherwise be in view)."""
    found = set()
    places = [p for p in sys.path if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
    for prefix in {str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve()), "/usr", "/usr/local"}:
        for pattern in SITE_PACKAGES:
            places += glob.glob(os.path.join(prefix, pattern))
    for path in places:
        if os.path.isdir(path) and not os.path.islink(path):
            found.add(str(Path(path).resolve()))
    return sorted(found)


def _private_ancestor(path: Path) -> str | None:
    """The topmost directory above ``path`` that others cannot search, if any."""
    for parent in reversed(path.parents):
        try:
            if not parent.stat().st_mode & 0o001:
                return str(parent)
        except OSError:
            return None
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _wait_uid_gone(uid: int, timeout: float = 5.0) -> None:
    """Wait until no process runs as ``uid`` (so the slot's next run starts with a clean process count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        alive = True
                        break
                except OSError:
                    continue
        if not alive:
            return
        time.sleep(0.01)


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def _reason(returncode: int | None, stderr: str) -> str:
    if returncode is not None and returncode < 0:
        signum = -returncode
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}.get(name, name)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit code {returncode}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
