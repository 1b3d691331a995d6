"""Worker processes die with the build that started them.

datatrove's local executor runs tasks in a ``multiprocess`` pool: pool workers are children of a fork server, and
a manager process is forked from the launching process. Killed with SIGKILL, the launcher gets no chance to stop
them, and a worker blocked on its task queue would wait forever. So every such process asks Linux for SIGKILL when
its parent dies (``prctl(PR_SET_PDEATHSIG)``): the manager when the launcher dies, the fork server likewise (it is
started with this module preloaded), and pool workers when the fork server dies. Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PRELOAD = __name__  # the module the fork server imports before forking workers


def die_with_parent(parent: int | None = None) -> None:
    """Have this process killed when its parent dies. ``parent``: the pid the parent had; if it is already gone
    (it died before the request was armed), exit now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return
    if armed and parent is not None and os.getppid() != parent:
        os._exit(1)


class _Guard:
    """Held by ``multiprocess``'s after-fork registry; ``pid`` is the process whose fork children must die with it."""

    def __init__(self) -> None:
        self.pid = os.getpid()


def _after_fork(guard: _Guard) -> None:
    die_with_parent(guard.pid)
    guard.pid = os.getpid()  # this child's own children must die with it, not with its parent


_guard: _Guard | None = None


def install() -> None:
    """From now on, children that ``multiprocess`` forks from this process die with it; a fork server started
    from now on dies with it too, and so do the workers it forks."""
    global _guard
    from multiprocess import forkserver, util

    if _guard is None:
        _guard = _Guard()
        util.register_after_fork(_guard, _after_fork)
    preload = list(getattr(forkserver._forkserver, "_preload_modules", None) or ["__main__"])
    if PRELOAD not in preload:
        forkserver.set_forkserver_preload([*preload, PRELOAD])


def _in_fork_server() -> bool:
    return "multiprocess.forkserver" in sys.modules and sys.argv[:1] == ["-c"]


if _in_fork_server():  # imported as the fork server's preload: arm it and the workers it forks
    die_with_parent()
    install()
