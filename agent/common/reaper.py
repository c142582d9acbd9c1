"""Contain handler processes that outlive their parent.

A handler's children (a RunScript script, whatever it spawns and leaves
behind) would be re-parented to init when their worker dies or when they
daemonize, and run on unsupervised. The process that supervises the agent
(``dsagent run``, or ``dsagent run-task``) declares itself a *child
subreaper* (Linux PR_SET_CHILD_SUBREAPER), so such orphans become its
children instead; ``kill_adopted`` then kills them with their process trees.

This costs nothing per task (unlike a pre-exec hook on every spawn).
"""

from __future__ import annotations

import ctypes
import logging
import os

import psutil

log = logging.getLogger("dsagent.reaper")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only); return True if it worked."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    except (OSError, AttributeError):
        return False


def kill_adopted(known_pids: set[int]) -> int:
    """Kill (and reap) every child of ours not in ``known_pids``; return how many.

    Only the given pids are waited for by their owners (subprocess.Popen);
    adopted ones are reaped here by pid, never with waitpid(-1), so no exit
    status of a known child is stolen.
    """
    killed = 0
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    for child in children:
        if child.pid in known_pids:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                victims = child.children(recursive=True) + [child]
                log.warning("killing orphaned process %d (%s) and %d descendant(s)",
                            child.pid, " ".join(child.cmdline())[:120], len(victims) - 1)
                for proc in victims:
                    proc.kill()
                killed += 1
            os.waitpid(child.pid, 0)
        except (psutil.Error, ChildProcessError):
            pass
    return killed
