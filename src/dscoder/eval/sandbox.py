"""Running untrusted programs: model completions under test, and later RL rewards.

Python programs run inside a small harness in the interpreter (``run(program, {"check", "entry_point"})``).
Programs in other languages (MultiPL-E) run as a command line: the harness writes the program to a file in its
working directory and runs ``sh -c COMMAND`` there, under the same isolation and limits
(``run(program, {"file": "main.rs", "command": "{rustc} -o main main.rs && ./main", "tools": {"rustc": PATH}})``);
``{name}`` in the command is replaced by where the tool ``name`` is reachable inside the sandbox. A run of a
command passes when the command exits 0 (as MultiPL-E's own harness judges it).

Two isolation levels, chosen automatically (``Sandbox(isolation=...)`` forces one):

``namespaces`` (root on Linux with util-linux's ``unshare`` and ``setpriv``; what CI and most containers have):
  each run gets new network, mount and PID namespaces; a fresh tmpfs on ``/tmp`` (its working directory),
  ``/var/tmp`` and ``/dev/shm``; an unprivileged uid of its own (61000 + slot, no groups, no new privileges);
  the interpreter reached through a read-only bind mount. So it cannot reach the network (only a downed loopback),
  cannot write anywhere but its tmpfs (every other writable place belongs to root), cannot see or signal the
  harness or other runs (other PID namespace, other uid), and killing the namespace's first process on timeout
  kills everything it started, forks that called ``setsid`` included.
``process`` (anything else): a child process in its own session and a scratch directory, with the same resource
  limits and the environment scrubbed; a program can still read and write what the user can and reach the
  network. Use it only for trusted code.

Both levels: limits on address space, CPU time, processes (per uid), file size, open files; a wall-clock timeout
enforced from outside; output capped; an environment of ``PATH``, ``HOME``, ``LANG`` only. A run passes only if the
program ran to its end: the harness prints a per-run nonce (not in the program's source or environment) after the
program and its checks returned, so ``sys.exit(0)`` or ``os._exit(0)`` before the asserts is a failure. For
HumanEval-style checks the candidate's results must be plain built-in values, so an object whose ``__eq__`` always
answers True does not pass. The program shares its interpreter with the harness's few lines, so a program written
to attack this harness (walking the interpreter's frames for the nonce) could fake a pass; it still could not
leave the sandbox.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dscoder.errors import DscoderError

_UID_BASE = 61000

# The harness inside the sandbox: reads the run spec from stdin, executes the program, runs the check, prints the
# nonce only if everything returned normally. Kept free of dscoder imports (it runs with the bare interpreter).
_DRIVER = r'''
import os, sys
def _strict(fn, _type=type, _allowed=(int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set,
                                      frozenset), _iter=iter, _exc=TypeError):
    def check(value):
        t = _type(value)
        if t not in _allowed:
            raise _exc("candidate returned a " + t.__name__ + ", not a built-in value")
        if t is dict:
            for k in value: check(k); check(value[k])
        elif t in (list, tuple, set, frozenset):
            for v in _iter(value): check(v)
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        check(result)
        return result
    return wrapped
def _main():
    # stdin: nonce, check function name, entry point name (empty: no call), then the program
    nonce, check_name, entry = (sys.stdin.readline().rstrip("\n") for _ in range(3))
    program = sys.stdin.read()
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "program.py", "exec"), ns)
        if entry:
            ns[check_name](_strict(ns[entry]))
    except SystemExit as e:
        sys.stderr.write("the program exited before its checks finished (SystemExit %r)\n" % (e.code,))
        sys.stderr.flush()
        os._exit(1)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()
    os._exit(0)
_main()
'''

# The harness for command-line programs: writes the program to a file, runs the command, prints the nonce only when
# it exited 0. It makes itself non-dumpable so that the command (same uid) cannot read the nonce from its memory.
_COMMAND_DRIVER = r'''
import os, sys, subprocess
def _main():
    # stdin: nonce, file name, command line, then the program
    nonce, name, command = (sys.stdin.readline().rstrip("\n") for _ in range(3))
    program = sys.stdin.read()
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except Exception:
        pass
    with open(name, "w", encoding="utf-8") as f:
        f.write(program)
    sys.stdout.flush()
    code = subprocess.call(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL)
    if code != 0:
        os._exit(1)
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()
    os._exit(0)
_main()
'''


@dataclass
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 64
    file_mb: int = 16
    open_files: int = 256
    output_bytes: int = 64 * 1024


@dataclass
class RunResult:
    status: str  # passed | failed | timeout
    reason: str = ""
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

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
            raise DscoderError("sandbox isolation 'namespaces' needs root and util-linux's unshare/setpriv")
        elif self.isolation not in ("namespaces", "process"):
            raise DscoderError(f"unknown sandbox isolation '{self.isolation}' (auto, namespaces or process)")
        self.workers = self.workers or os.cpu_count() or 1
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(max(self.workers, 1) * 2):
            self._slots.put(slot)

    # ----- one program ------------------------------------------------------------------------------------------
    def run(self, program: str, call: dict[str, str] | None = None) -> RunResult:
        """Run ``program`` (Python source); with ``call = {"check": ..., "entry_point": ...}`` then run
        ``check(entry_point)`` with the entry point's results held to built-in values. With
        ``call = {"file": NAME, "command": LINE, "tools": {name: host path}}`` write the program (any language) to
        ``NAME`` and run ``sh -c LINE`` instead (see the module's docstring)."""
        slot = self._slots.get()
        try:
            return self._run(program, call, slot)
        finally:
            self._slots.put(slot)

    def run_many(self, programs: list[tuple[str, dict | None]]) -> Iterator[RunResult]:
        """Results in the order of ``programs``, each as soon as it (and those before it) finished."""
        with ThreadPoolExecutor(self.workers) as pool:
            yield from pool.map(lambda p: self.run(*p), programs)

    def _run(self, program: str, call: dict | None, slot: int) -> RunResult:
        nonce = secrets.token_hex(16)
        driver, mounts = _DRIVER, {}
        if call and "command" in call:
            driver, mounts, spec = self._command_spec(nonce, program, call)
        else:
            spec = f"{nonce}\n{(call or {}).get('check', '')}\n{(call or {}).get('entry_point', '')}\n{program}"
        private = Path(tempfile.mkdtemp(prefix="dscoder-run-"))  # root-only: output files, process-mode scratch
        os.chmod(private, 0o700)
        out_path, err_path = private / "stdout", private / "stderr"
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                if self.isolation == "namespaces":
                    cmd, cwd = self._namespace_command(_UID_BASE + slot, driver, mounts), "/"
                else:
                    scratch = private / "scratch"
                    scratch.mkdir()
                    cmd, cwd = [*self._prlimit(), sys.executable, "-I", "-S", "-c", driver], str(scratch)
                start = time.perf_counter()
                # no preexec_fn: the limits are set by prlimit, so Popen can spawn without copying this process
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd,
                                        env=self._env(cwd), start_new_session=True)
                try:
                    proc.communicate(spec.encode(), timeout=self.limits.timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                except BrokenPipeError:  # the program died before reading its spec
                    proc.wait(timeout=self.limits.timeout_s)
                    timed_out = False
                finally:
                    _kill_group(proc)
                    if self.isolation == "namespaces":
                        _wait_uid_gone(_UID_BASE + slot)  # the kernel tears the PID namespace down
                seconds = time.perf_counter() - start
            stdout = _read_capped(out_path, self.limits.output_bytes)
            stderr = _read_capped(err_path, self.limits.output_bytes)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        if timed_out:
            return RunResult("timeout", f"timed out after {self.limits.timeout_s:g} s", None, stdout, stderr, seconds)
        lines = [line for line in stdout.splitlines() if line.strip()]
        if proc.returncode == 0 and lines and lines[-1].strip() == nonce:
            return RunResult("passed", "", 0, stdout.rsplit(nonce, 1)[0].rstrip("\n"), stderr, seconds)
        reason = ("the program exited before its checks finished" if proc.returncode == 0
                  else _reason(proc.returncode, stderr))
        return RunResult("failed", reason, proc.returncode, stdout.replace(nonce, ""), stderr, seconds)

    # ----- plumbing ---------------------------------------------------------------------------------------------
    def _command_spec(self, nonce: str, program: str, call: dict) -> tuple[str, dict[str, str], str]:
        """The command driver's stdin, with ``{tool}`` placeholders resolved; tools outside world-readable
        directories (e.g. a rustup toolchain under /root) are bind-mounted read-only into the namespace."""
        name, command = call["file"], call["command"]
        if "/" in name or not name.strip() or "\n" in name or "\n" in command:
            raise DscoderError(f"sandbox command: bad file name {name!r} or a command with a newline")
        mounts: dict[str, str] = {}
        for tool, host in (call.get("tools") or {}).items():
            path = Path(host).resolve()
            inside = str(path)
            if self.isolation == "namespaces" and not _world_reachable(path):
                root = path.parent.parent  # bin/TOOL → the toolchain's prefix
                mounts[str(root)] = f"/tmp/.tools/{tool}"
                inside = f"/tmp/.tools/{tool}/{path.relative_to(root)}"
            command = command.replace("{" + tool + "}", _quote(inside))
        return _COMMAND_DRIVER, mounts, f"{nonce}\n{name}\n{command}\n{program}"

    def _namespace_command(self, uid: int, driver: str = _DRIVER, mounts: dict[str, str] | None = None) -> list[str]:
        prefix = Path(sys.base_prefix).resolve()
        exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
        try:
            inside = "/tmp/.python/" + str(exe.relative_to(prefix))
        except ValueError:
            prefix, inside = exe.parent, "/tmp/.python/" + exe.name
        setup = " && ".join([
            "mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp",
            "mount -t tmpfs -o size=16m,mode=1777 tmpfs /var/tmp",
            "mount -t tmpfs -o size=16m,mode=1777 tmpfs /dev/shm",
            "mount -t proc proc /proc",
            "mkdir /tmp/.python /tmp/work",
            f"mount --bind -o ro {_quote(str(prefix))} /tmp/.python",
            "mount -o remount,bind,ro /tmp/.python",
            *(f"mkdir -p {inside} && mount --bind -o ro {_quote(host)} {inside} && mount -o remount,bind,ro {inside}"
              for host, inside in (mounts or {}).items()),
            f"chown {uid}:{uid} /tmp/work",
            "cd /tmp/work",
            f"exec {' '.join(self._prlimit())} setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs "
            f"-- {inside} -I -S -c \"$0\"",
        ])
        return ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
                "sh", "-c", setup, driver]

    def _env(self, home: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": "/tmp/work" if self.isolation == "namespaces" else home,
                "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}

    def _prlimit(self) -> list[str]:
        """util-linux prlimit: address space, CPU seconds, processes (per uid), file size, open files, no cores."""
        lim = self.limits
        return ["prlimit", f"--as={lim.memory_mb << 20}", f"--cpu={int(lim.timeout_s) + 2}",
                f"--nproc={lim.max_processes}", f"--fsize={lim.file_mb << 20}", f"--nofile={lim.open_files}",
                "--core=0", "--"]


def namespaces_available() -> bool:
    if os.geteuid() != 0 or sys.platform != "linux" or not all(map(shutil.which, ("unshare", "setpriv", "prlimit"))):
        return False
    try:
        probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "true"], capture_output=True,
                               timeout=10)
        return probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _world_reachable(path: Path) -> bool:
    """Whether an unprivileged uid can reach ``path`` (every directory above it searchable by others) and read or
    execute it."""
    try:
        if not path.stat().st_mode & 0o005:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in path.parents)
    except OSError:
        return False


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
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        return {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}.get(name, name)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit code {returncode}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
