"""The sandbox's own side (see ``dscoder.eval.sandbox``): run as ``python -I -S -c <this file's text>``, so it uses
the bare interpreter and nothing of dscoder; the host imports it only for the plain-data codec.

Processes: a slot's ``launcher`` (namespaces: joins the slot's cgroups once, forks each run) → ``start`` (unshares
the namespaces, forks the namespace's first process) → ``main`` (mounts, limits; forks the candidate process before
it reads the tests or the nonce, then becomes the checker). In ``process`` isolation the harness starts ``main``
directly. stdin: frame 1 = the setup (no secrets), frame 2 = the job (nonce, tests, program; read by the checker).
The verdict goes to its own file descriptor: ``("pass", nonce[, collected])`` or ``("fail", reason, verdict[,
collected])``, ``collected`` being the value of the job's ``collect`` name in the tests' scope (plain data).

Plain data (``encode``/``decode``). Tags: N T F none/bools; i int (hex); f float (float.hex); c complex; s str and b
bytes (length:data); l t S z d list/tuple/set/frozenset/dict (count:items). Frames: 8-byte little-endian length.
"""

import builtins
import ctypes
import os
import resource
import signal
import sys


class NotPlain(Exception):
    """A value that is not plain data (or nested too deep)."""


_SEQ = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_BASES = (int, float, complex, str, bytes, list, tuple, dict, set, frozenset)


def encode(v, out=None, depth=0):
    """``v`` as bytes; NotPlain for anything but plain data."""
    top = out is None
    if top:
        out = []
    if depth > 200:
        raise NotPlain("a value nested deeper than 200")
    t = type(v)
    if v is None:
        out.append(b"N")
    elif t is bool:
        out.append(b"T" if v else b"F")
    elif t is int:
        out.append(b"i%x;" % v)
    elif t is float:
        out.append(b"f" + v.hex().encode() + b";")
    elif t is complex:
        out.append(b"c" + v.real.hex().encode() + b"," + v.imag.hex().encode() + b";")
    elif t is str:
        b = v.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(b))
        out.append(b)
    elif t is bytes:
        out.append(b"b%d:" % len(v))
        out.append(v)
    elif t in _SEQ:
        items = list(v)
        out.append(_SEQ[t] + b"%d:" % len(items))
        for x in items:
            encode(x, out, depth + 1)
    elif t is dict:
        items = list(v.items())
        out.append(b"d%d:" % len(items))
        for k, x in items:
            encode(k, out, depth + 1)
            encode(x, out, depth + 1)
    else:
        for base in _BASES:  # a subclass (Counter, namedtuple, ...) goes as its plain value, without its methods
            if isinstance(v, base):
                encode(base(v), out, depth + 1)
                break
        else:
            raise NotPlain("a " + t.__name__)
    return b"".join(out) if top else None


_HEX = frozenset(b"-0123456789abcdef")


_FLT = frozenset(b"-+0123456789abcdefxp.inft")


_DIG = frozenset(b"0123456789")


def decode(data):
    """The value ``encode`` made; ValueError (or IndexError, UnicodeDecodeError) for anything else. Builds nothing but
    plain values, never runs code; sizes are bounded by the frame (``MAX_FRAME``) and the depth by 200."""
    value, p = _dec(data, 0, 0)
    if p != len(data):
        raise ValueError("trailing bytes")
    return value


def _field(data, p, end, allowed):
    j = data.index(end, p)
    if j - p > 1 << 20 or not allowed.issuperset(data[p:j]):
        raise ValueError("bad number")
    return data[p:j].decode("ascii"), j + 1


def _dec(data, p, depth):
    if depth > 200:
        raise ValueError("nested too deep")
    tag = data[p:p + 1]
    p += 1
    if tag == b"N":
        return None, p
    if tag == b"T":
        return True, p
    if tag == b"F":
        return False, p
    if tag == b"i":
        s, p = _field(data, p, b";", _HEX)
        return int(s, 16), p
    if tag == b"f":
        s, p = _field(data, p, b";", _FLT)
        return float.fromhex(s), p
    if tag == b"c":
        re, p = _field(data, p, b",", _FLT)
        im, p = _field(data, p, b";", _FLT)
        return complex(float.fromhex(re), float.fromhex(im)), p
    s, p = _field(data, p, b":", _DIG)
    n = int(s)
    if tag in (b"s", b"b"):
        if p + n > len(data):
            raise ValueError("truncated")
        raw = data[p:p + n]
        return (raw.decode("utf-8", "surrogatepass") if tag == b"s" else bytes(raw)), p + n
    if tag == b"d":
        out = {}
        for _ in range(n):
            k, p = _dec(data, p, depth + 1)
            out[k], p = _dec(data, p, depth + 1)
        return out, p
    if tag in (b"l", b"t", b"S", b"z"):
        items = []
        for _ in range(n):
            x, p = _dec(data, p, depth + 1)
            items.append(x)
        return {b"l": list, b"t": tuple, b"S": set, b"z": frozenset}[tag](items), p
    raise ValueError("unknown tag")


MAX_FRAME = 64 << 20


def write_frame(fd, data):
    data = len(data).to_bytes(8, "little") + data
    while data:
        data = data[os.write(fd, data):]


def read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd):
    n = int.from_bytes(read_exact(fd, 8), "little")
    if n > MAX_FRAME:
        raise ValueError("a message of %d bytes" % n)
    return read_exact(fd, n)

libc = ctypes.CDLL(None, use_errno=True)

# Linux constants (uapi headers)
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE, O_CLOEXEC = -100, 0x1000, 0x8000, 0o2000000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_RDONLY = 1, 4, 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 1 << 12, 1 << 14, 1 << 18
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 1, 4, 22, 38, 2
# (audit architecture, syscall numbers) of the architectures the seccomp filter knows
ARCHES = {
    "x86_64": (0xC000003E, dict(
        unshare=272, setns=308, clone=56, clone3=435, mount=165, umount2=166, pivot_root=155, chroot=161,
        add_key=248, request_key=249, keyctl=250, bpf=321, ptrace=101, process_vm_readv=310, process_vm_writev=311,
        kcmp=312, perf_event_open=298, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, socket=41, socketpair=53, io_setup=206)),
    "aarch64": (0xC00000B7, dict(
        unshare=97, setns=268, clone=220, clone3=435, mount=40, umount2=39, pivot_root=41, chroot=51,
        add_key=217, request_key=218, keyctl=219, bpf=280, ptrace=117, process_vm_readv=270, process_vm_writev=271,
        kcmp=272, perf_event_open=241, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, socket=198, socketpair=199, io_setup=0)),
}
# refused with EPERM (clone only with a CLONE_NEW* flag; socket for every family but AF_INET and AF_INET6, whose
# network is the run's own: AF_UNIX reaches the host's socket files, AF_VSOCK is not namespaced and reaches the
# machine's hypervisor and other guests, AF_NETLINK and the rest are kernel attack surface; socketpair of
# SOCK_DGRAM, whose sendto can name a host socket file; clone3 gets ENOSYS)
DENY = ("unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "add_key", "request_key", "keyctl", "bpf",
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "perf_event_open", "userfaultfd",
        "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree", "move_mount", "fsopen", "fsconfig",
        "fsmount", "fspick", "mount_setattr",
        "io_setup")  # Linux AIO contexts come from one machine-wide pool (fs.aio-max-nr): a run could drain it
CLONE_NEW_ANY = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
                 | CLONE_NEWNET)
AF_INET, AF_INET6, SOCK_DGRAM, SOCK_TYPE_MASK = 2, 10, 2, 0xF


def fail(what):
    raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))


def syscall(name, *args):
    return libc.syscall(ARCHES[os.uname().machine][1][name], *args)


def set_readonly(dfd, path, flags, readonly=True):
    attr = (ctypes.c_uint64 * 4)(*((MOUNT_ATTR_RDONLY, 0) if readonly else (0, MOUNT_ATTR_RDONLY)), 0, 0)
    if syscall("mount_setattr", ctypes.c_int(dfd), path, ctypes.c_uint(flags), attr, ctypes.c_size_t(32)) != 0:
        fail("mount_setattr " + path.decode())


def mount(src, target, fstype, flags, data):
    if libc.mount(src, target, fstype, ctypes.c_ulong(flags), data) != 0:
        fail("mount " + (target or b"").decode())


def setup(cfg):
    """The run's filesystem view (as root, in its new mount namespace): every mount read-only; fresh tmpfs on the
    scratch directories; empty read-only tmpfs over the hidden ones; the interpreter and tools re-exposed read-only
    at their own paths; empty read-only tmpfs over the masked ones (site-packages); /dev/null (read-only, as /dev
    is) over the files at the top of /; a /proc of the new PID namespace; the working directory /tmp/work."""
    trees = []
    for path in cfg["expose"]:  # detached read-only copies, attached again once their parents are hidden
        fd = syscall("open_tree", ctypes.c_int(AT_FDCWD), path.encode(),
                     ctypes.c_uint(OPEN_TREE_CLONE | AT_RECURSIVE | O_CLOEXEC))
        if fd < 0:
            fail("open_tree " + path)
        set_readonly(fd, b"", AT_EMPTY_PATH | AT_RECURSIVE)
        trees.append((fd, path))
    set_readonly(AT_FDCWD, b"/", AT_RECURSIVE)
    for path, size in cfg["scratch"]:
        mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=" + size.encode())
    for path in cfg["hide"]:
        mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m")
    os.umask(0o022)
    for fd, path in trees:
        os.makedirs(path, exist_ok=True)
        if syscall("move_mount", ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD), path.encode(),
                   ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)) != 0:
            fail("move_mount " + path)
        os.close(fd)
    for path in cfg["hide"]:
        set_readonly(AT_FDCWD, path.encode(), 0)
    for path in cfg["mask"]:
        mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=4k")
    for path in cfg.get("mask_files", ()):  # files (and sockets) at the top of / read as empty
        mount(b"/dev/null", path.encode(), None, MS_BIND, None)
    mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    os.mkdir("/tmp/work")
    os.chown("/tmp/work", cfg["uid"], cfg["uid"])
    os.chdir("/tmp/work")


def seccomp():
    """Install the candidate's filter (classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip;
    u64 args[6]}): a foreign ABI kills the process, DENY answers EPERM. False on an architecture it does not know."""
    arch = os.uname().machine
    if sys.platform != "linux" or arch not in ARCHES:
        return False
    audit, nr = ARCHES[arch]
    KILL, ALLOW, EPERM, ENOSYS = 0x80000000, 0x7FFF0000, 0x00050001, 0x00050026  # SECCOMP_RET_*
    LD, JEQ, JGE, JSET, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K,
    # BPF_ALU|AND|K, BPF_RET|K
    NR, ARCH, ARG0, ARG1 = 0, 4, 16, 24  # offsets in seccomp_data (ARGn: the low half of args[n], little-endian)
    prog = [(LD, 0, 0, ARCH), (JEQ, 1, 0, audit), (RET, 0, 0, KILL), (LD, 0, 0, NR)]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]  # the x32 ABI's numbers
    for name in DENY:
        prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS),
             (JEQ, 0, 4, nr["clone"]), (LD, 0, 0, ARG0), (JSET, 0, 1, CLONE_NEW_ANY), (RET, 0, 0, EPERM),
             (RET, 0, 0, ALLOW),
             (JEQ, 0, 5, nr["socket"]), (LD, 0, 0, ARG0), (JEQ, 2, 0, AF_INET), (JEQ, 1, 0, AF_INET6),
             (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),
             (JEQ, 0, 5, nr["socketpair"]), (LD, 0, 0, ARG1), (AND, 0, 0, SOCK_TYPE_MASK), (JEQ, 0, 1, SOCK_DGRAM),
             (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),
             (RET, 0, 0, ALLOW)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail("no_new_privs")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Prog(len(prog), filters)), 0, 0) != 0:
        fail("seccomp")
    return True


def drop(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def kind(value):
    if type(value).__name__ == "module" and type(value) is type(sys):
        return ("m", str(value.__name__))
    if callable(value):
        return ("f",)
    try:
        encode(value)
        return ("v", value)
    except BaseException:
        return ("o",)


def run_stdio(code, text, cap):
    """Run the compiled program once as a program: ``text`` on its stdin (a memfd), its stdout read back (at most
    ``cap`` bytes) from a pipe, in a forked child, so every test starts from the same state. SystemExit ends the
    program normally (LiveCodeBench's harness swallows it too); any other exception is the run's error."""
    data = text.encode("utf-8", "surrogatepass")
    fd_in = os.memfd_create("stdin")
    _write_all(fd_in, data)
    os.lseek(fd_in, 0, 0)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    flush()
    pid = os.fork()
    if pid == 0:
        code_ = 0
        try:
            os.close(out_r)
            os.close(err_r)
            os.dup2(fd_in, 0)
            os.dup2(out_w, 1)
            sys.stdin = open(0, "r", encoding="utf-8", errors="surrogateescape", closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)
            try:
                exec(code, {"__name__": "__main__", "__builtins__": builtins})
            except SystemExit:
                pass
            flush()
        except BaseException as e:
            flush()
            try:
                os.write(err_w, (type(e).__name__ + ": " + str(e)[:300]).encode("utf-8", "replace"))
                import traceback
                traceback.print_exc()
            except BaseException:
                pass
            code_ = 1
        os._exit(code_)
    for fd in (fd_in, out_w, err_w):
        os.close(fd)
    chunks, size, truncated = [], 0, False
    while True:
        chunk = os.read(out_r, 1 << 16)
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            truncated = True
            try:
                os.kill(pid, 9)
            except OSError:
                pass
            break
        chunks.append(chunk)
    error = b""
    while True:
        chunk = os.read(err_r, 4096) if not truncated else b""
        if not chunk or len(error) > 1000:
            break
        error += chunk
    os.close(out_r)
    os.close(err_r)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    text = error.decode("utf-8", "replace")
    if truncated:
        text = "its output exceeded %d bytes" % cap
    elif status < 0:
        text = "killed by signal %d" % -status
    elif status and not text:
        text = "exit code %d" % status
    return {"stdout": b"".join(chunks).decode("utf-8", "replace"), "error": text or None}


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def serve(rfd, wfd):
    """The candidate process: run the program, then answer calls until the checker is done."""
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    program = None
    while True:
        try:
            msg = decode(read_frame(rfd))
        except BaseException:
            os._exit(0)
        op = msg[0]
        if op == "command":
            _, name, program, command = msg
            with open(name, "w", encoding="utf-8") as f:
                f.write(program)
            os.execv("/bin/sh", ["sh", "-c", command])
        if op in ("exec", "compile"):
            try:
                program = compile(msg[1], "program.py", "exec")
            except BaseException as e:
                write_frame(wfd, encode(("compile", type(e).__name__ + ": " + str(e)[:300])))
                continue
        try:
            if op == "exec":
                exec(program, ns)
                reply = ("ok", None)
            elif op == "compile":
                for name in msg[2]:  # warm the modules the program imports, once for all its runs
                    if name in MODULES:
                        __import__(name)
                reply = ("ok", None)
            elif op == "stdio":
                reply = ("ok", run_stdio(program, msg[1], msg[2]))
            elif op == "names":
                reply = ("ok", {n: kind(ns[n]) for n in msg[1] if n in ns})
            else:
                reply = ("ok", ns[msg[1]](*msg[2], **msg[3]))
        except SystemExit as e:
            reply = ("exit", repr(e.code)[:200])
        except BaseException as e:
            try:
                reply = ("exc", type(e).__name__, str(e)[:500])
            except BaseException:
                reply = ("exc", type(e).__name__, "")
            try:
                import traceback
                traceback.print_exc()
            except BaseException:
                pass
        flush()
        try:
            data = encode(reply)
        except BaseException as e:
            data = encode(("bad", "returned " + (str(e.args[0]) if type(e) is NotPlain else "a value it cannot send")
                           + ", not a plain value"))
        write_frame(wfd, data)


class Violation(BaseException):
    """The candidate broke the protocol: the run fails whatever the tests do with the exception."""


class CandidateError(Exception):
    """A candidate exception of a type that is not a built-in exception."""


class CompileFailed(Exception):
    """The program does not compile (a SyntaxError): the verdict is compile_error."""


class Checker:
    """The checker's end of the pipe to the candidate process."""

    def __init__(self, pid, wfd, rfd):
        self.pid, self.wfd, self.rfd, self.violation = pid, wfd, rfd, None
        self.kind = None  # the verdict of a violation: None (failed or runtime_error) or "timeout"
        self.limit = None  # seconds a call may take (set by the tests through time_limit)
        self.collected = None

    def time_limit(self, seconds):
        """The tests' own per-call time limit (None: only the run's wall clock)."""
        self.limit = None if seconds is None else float(seconds)

    def ask(self, msg):
        try:
            write_frame(self.wfd, encode(msg))
        except NotPlain as e:
            self.fail_hard("a test passed " + str(e.args[0]) + " to the candidate; only plain values cross the sandbox")
        except OSError:
            self.died()
        if self.limit is not None:
            import select
            if not select.select([self.rfd], [], [], self.limit)[0]:
                self.kind = "timeout"
                self.fail_hard("a test call ran past its time limit of %g s" % self.limit)
        try:
            reply = decode(read_frame(self.rfd))
            if type(reply) is not tuple or not reply or reply[0] not in ("ok", "exc", "exit", "bad", "compile"):
                raise ValueError("not a reply")
        except EOFError:
            self.died()
        except Violation:
            raise
        except BaseException as e:
            self.fail_hard("the candidate sent a malformed reply (" + type(e).__name__ + ")")
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "compile":
            raise CompileFailed(str(reply[1]))
        if reply[0] == "exit":
            self.fail_hard("the program exited before its checks finished (SystemExit " + str(reply[1]) + ")")
        if reply[0] == "bad":
            self.fail_hard("the candidate " + str(reply[1]))
        name, text = str(reply[1]), str(reply[2])
        exc = getattr(builtins, name, None)
        # StopIteration would end the test's map()/zip() loop early and skip its asserts, not report an error
        if isinstance(exc, type) and issubclass(exc, Exception) and exc.__module__ == "builtins" \
                and not issubclass(exc, (StopIteration, StopAsyncIteration)):
            try:
                raise exc(text)
            except TypeError:
                pass
        raise CandidateError(name + ": " + text)

    def died(self):
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        how = "killed by signal %d" % -code if code < 0 else "exit code %d" % code
        self.fail_hard("the program exited before its checks finished (" + how + ")")

    def fail_hard(self, reason):
        self.violation = self.violation or reason
        raise Violation(reason)

    def proxy(self, name):
        def candidate(*args, **kwargs):
            return self.ask(("call", name, args, kwargs))
        candidate.__name__ = candidate.__qualname__ = name
        return candidate


def names_in(code, out):
    out.update(code.co_names)
    for const in code.co_consts:
        if type(const) is type(code):
            names_in(const, out)
    return out


def where(exc, source):
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "tests.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None:
        return ""
    lines = source.splitlines()
    return " at tests line %d" % line + (": " + lines[line - 1].strip()[:200] if line <= len(lines) else "")


# standard-library modules a test may use through the candidate's import of them (the checker imports its own);
# others (antigravity, turtle, ...) have side effects on import and are not imported for the candidate
MODULES = frozenset(("math", "cmath", "re", "string", "itertools", "functools", "collections", "heapq", "bisect",
                     "operator", "statistics", "fractions", "decimal", "random", "datetime", "copy", "json", "hashlib",
                     "struct", "array", "numbers", "typing", "textwrap", "unicodedata", "sys", "os", "time",
                     "calendar", "enum", "dataclasses", "base64", "binascii", "zlib", "difflib"))


def broken(checker):
    """(reason, verdict) for a run the candidate broke off, ran out of time in, or broke the rules of."""
    reason = checker.violation
    if checker.kind:
        return reason, checker.kind
    return reason, "runtime_error" if "killed by signal" in reason else "failed"


def stripped_lines(text):
    """LiveCodeBench's view of an output: the whole text stripped, split at newlines, each line stripped
    (lcb_runner/evaluation/testing_util.py, get_stripped_lines)."""
    return [line.strip() for line in text.strip().split("\n")]


def same_stdout(got, want):
    """LiveCodeBench's stdin/stdout comparison (testing_util.py, grade_stdio): the same number of stripped lines, and
    each pair equal as text or, failing that, as lists of Decimals of their whitespace-separated fields."""
    from decimal import Decimal
    a, b = stripped_lines(got), stripped_lines(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            if [Decimal(v) for v in x.split()] != [Decimal(v) for v in y.split()]:
                return False
        except Exception:
            return False
    return True


def shorten(text, n=120):
    text = str(text)
    return text if len(text) <= n else text[:n // 2] + "..." + text[-n // 2:]


def check_stdio(job, checker):
    """stdin/stdout mode: compile the program once, then run it per test with the test's input on stdin, comparing
    its stdout as LiveCodeBench does; the first failing test decides (as there)."""
    try:
        checker.ask(("compile", job["program"], tuple(job.get("warm") or ())))
    except CompileFailed as e:
        return "the program does not compile: " + str(e), "compile_error"
    except Violation:
        return broken(checker)
    cap = int(job.get("stdout_cap") or 1 << 24)
    for i, (given, want) in enumerate(job["stdio"]):
        checker.time_limit(job.get("test_timeout"))
        try:
            got = checker.ask(("stdio", given, cap))
        except Violation:
            reason, kind = broken(checker)
            return "test %d: %s" % (i, reason), kind
        if type(got) is not dict or type(got.get("stdout")) is not str:
            return "the candidate sent a malformed reply", "failed"
        if got.get("error"):
            return "test %d: the program raised %s" % (i, shorten(got["error"], 300)), "runtime_error"
        if not same_stdout(got["stdout"], want):
            return ("test %d: wrong answer: printed %r, expected %r"
                    % (i, shorten(got["stdout"].strip()), shorten(want.strip()))), "failed"
    return None


def check(job, checker):
    """None if the run passed, else (reason, verdict): failed (the tests said no, or the candidate broke the rules)
    or runtime_error (the candidate raised or crashed)."""
    if job.get("command") is not None:
        write_frame(checker.wfd, encode(("command", job["file"], job["program"], job["command"])))
        code = os.waitstatus_to_exitcode(os.waitpid(checker.pid, 0)[1])
        if code != 0:
            return ("the command exited with code %d" % code if code > 0
                    else "the command was killed by signal %d" % -code), "failed"
        return None
    if job.get("stdio") is not None:
        return check_stdio(job, checker)
    tests = job.get("tests")
    try:
        checker.ask(("exec", job["program"]))
    except CompileFailed as e:
        return "the program does not compile: " + str(e), "compile_error"
    except Violation:
        return broken(checker)
    except BaseException as e:
        text = str(e)
        reason = "the program raised " + (text if type(e) is CandidateError else type(e).__name__
                                          + (": " + text[:300] if text else ""))
        return reason, "failed" if tests is None and type(e) is AssertionError else "runtime_error"
    if tests is None:
        return None
    try:
        code = compile(tests, "tests.py", "exec")
        wanted = names_in(code, set())
        entry = job.get("entry_point")
        if entry:
            wanted.add(entry)
        # a built-in name stays the checker's own (a candidate cannot redefine len), except the entry point's; the
        # checker's own names (the job's DATA, time_limit) are never the candidate's
        own = {"DATA": job.get("data"), "time_limit": checker.time_limit}
        wanted = tuple(sorted(n for n in wanted if n == entry or (not hasattr(builtins, n) and n not in own)))
        scope = {"__name__": "__main__", "__builtins__": builtins}
        checker.scope = scope
        if job.get("prelude"):  # the task's own code (HumanEval's prompt): its helpers are the checker's, so a
            # candidate that redefines encode_cyclic or poly cannot change what the tests compare against
            try:
                exec(compile(job["prelude"], "prelude.py", "exec"), scope)
            except Exception as e:  # the task's fault, not the candidate's
                return "the task's prelude failed: " + type(e).__name__ + ": " + str(e)[:300], "sandbox_error"
            scope.pop(entry, None)  # the prompt's stub of it
            wanted = tuple(n for n in wanted if n == entry or n not in scope)
        found = checker.ask(("names", wanted))
        if type(found) is not dict:
            checker.fail_hard("the candidate sent a malformed reply")
        for name in wanted:
            info = found.get(name)
            if type(info) is not tuple or not info:
                continue
            if info[0] == "f":
                scope[name] = checker.proxy(name)
            elif info[0] == "v" and len(info) == 2:
                scope[name] = info[1]
            elif info[0] == "m" and type(info[1]) is str and info[1].split(".")[0] in MODULES:
                __import__(info[1])
                scope[name] = sys.modules[info[1]]
        if entry and entry not in scope:
            return "the program does not define " + entry, "failed"
        scope.update(own)
        exec(code, scope)
        if job.get("check"):
            scope[job["check"]](scope[entry])
    except BaseException as e:
        if checker.violation:  # whatever the tests did with the exception
            return broken(checker)
        text = str(e)
        reason = type(e).__name__ + (": " + text[:300] if text else "") + where(e, tests)
        return reason, "failed" if isinstance(e, AssertionError) else "runtime_error"
    return broken(checker) if checker.violation else None


def main(cfg):
    verdict = cfg["verdict_fd"]
    try:
        if cfg["isolation"] == "namespaces":
            setup(cfg)
        for res, value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_CPU, cfg["cpu"]),
                           (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_NOFILE, cfg["nofile"]),
                           # a core limit of 1, not 0: the kernel ignores the limit when core_pattern pipes to a
                           # handler (systemd-coredump, apport: a core written on the host), except the value 1
                           (resource.RLIMIT_CORE, 1), (getattr(resource, "RLIMIT_RTPRIO", None), 0),
                           (getattr(resource, "RLIMIT_NICE", None), 0)):
            if res is not None:  # no real-time scheduling, no raised priority (a harness may have either)
                resource.setrlimit(res, (value, value))
        child_r, parent_w = os.pipe()  # checker → candidate
        parent_r, child_w = os.pipe()  # candidate → checker
    except BaseException as e:
        write_frame(verdict, encode(("error", "sandbox setup failed: " + str(e))))
        os._exit(70)
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (verdict, parent_w, parent_r):
                os.close(fd)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
            if cfg["isolation"] == "namespaces":
                drop(cfg["uid"])
            seccomp()
        except BaseException as e:
            write_frame(child_w, encode(("setup", "sandbox setup failed: " + str(e))))
            os._exit(70)
        write_frame(child_w, encode(("ready",)))  # before any of the candidate's code ran: to be trusted
        serve(child_r, child_w)
    os.close(child_r)
    os.close(child_w)
    if cfg["isolation"] == "namespaces":
        drop(cfg["checker_uid"])
    if sys.platform == "linux":
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the candidate cannot read this process's memory or fds
    job = decode(read_frame(0))
    try:
        ready = decode(read_frame(parent_r))
    except BaseException as e:
        ready = ("setup", "sandbox setup failed: " + type(e).__name__)
    collected = ()
    if ready != ("ready",):
        failure = str(ready[1]), "sandbox_error"
    else:
        checker = Checker(pid, parent_w, parent_r)
        failure = check(job, checker)
        if job.get("collect") and getattr(checker, "scope", None) is not None:
            try:
                encode(checker.scope.get(job["collect"]))
                collected = (checker.scope.get(job["collect"]),)
            except BaseException:
                collected = ()
    verdict_msg = ("pass", job["nonce"]) if failure is None else ("fail", *failure)
    write_frame(verdict, encode(verdict_msg + collected))
    if cfg["isolation"] != "namespaces":
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    os._exit(0)


def launcher(sock_fd, cgroups):
    """A slot's launcher (namespaces): lives in the slot's cgroups (joined once: a move between cgroups costs an
    RCU grace period) and forks each run, which unshares its namespaces and forks the run's first process."""
    import socket  # (it ends when the harness closes its end of the socket, or dies)
    for procs in cgroups:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    try:  # an OOM kill in the slot takes a run's process, not the launcher (needs CAP_SYS_RESOURCE)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
    sock = socket.socket(fileno=sock_fd)
    launcher_pid = os.getpid()
    running = []
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 8)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        for pid in running:  # the slot's previous run has torn its namespaces down
            os.waitpid(pid, 0)
        running = []
        try:
            pid = os.fork()
        except OSError as e:  # e.g. the slot's task limit: the run fails with the reason, the launcher lives on
            write_frame(fds[3], encode(("error", "sandbox error: cannot start the run: " + str(e))))
            os.write(fds[4], b"-1\n")
        else:
            if pid == 0:
                sock.close()
                start(decode(msg), fds, launcher_pid)
            running = [pid]
        for fd in fds:
            os.close(fd)


def start(cfg, fds, launcher_pid):
    """Unshare the run's namespaces, fork its first process and report it. When the launcher dies (the harness was
    killed: the launcher ends with its socket) the run ends too, rather than live on (a sleeping candidate and its
    waiting checker would, holding the slot's uids)."""
    job, out, err, verdict, status = fds
    first = []

    def orphaned(signum, frame):
        for pid in first:  # the namespace's first process: the kernel kills the rest with it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, orphaned)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher_pid:  # it died before the prctl
        orphaned(0, None)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")  # the run's processes go first when the slot is out of memory
        for fd, to in ((job, 0), (out, 1), (err, 2)):
            os.dup2(fd, to)
            os.close(fd)
        cfg["verdict_fd"] = verdict
        # new namespaces; with CLONE_NEWPID the next child is the new PID namespace's first process
        if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID) != 0:
            fail("unshare")
        mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the first process is known
        pid = os.fork()
    except BaseException as e:
        write_frame(verdict, encode(("error", "sandbox setup failed: " + str(e))))
        os._exit(70)
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.close(status)
        main(cfg)
    first.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(verdict)
    os.write(status, b"%d\n" % pid)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os.write(status, b"%d\n" % code)
    os._exit(0)


def probe():
    """Exit 0 if this machine can make a run's namespaces and read-only view (root, Linux 5.12 or later)."""
    pid = os.fork()
    if pid == 0:
        try:
            if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID) != 0:
                fail("unshare")
            mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
            set_readonly(AT_FDCWD, b"/", AT_RECURSIVE)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        probe()
    elif sys.argv[1:2] == ["launcher"]:
        launcher(int(sys.argv[2]), sys.argv[3:])
    else:
        main(decode(read_frame(0)))
