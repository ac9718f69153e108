"""The last step before a submission's kernel starts: become its own user, set its limits, exec the kernel.

Run by the grader (inside the bubblewrap sandbox when there is one) as

    python -I -S confine.py [--uid N] [--cwd DIR] --memory BYTES --processes N --file-size BYTES -- COMMAND...

It imports the standard library only and runs without `site`, so nothing a submission could have left in
an import path runs before the limits hold. The limits are inherited by every process the kernel starts:

- memory: the address space of each process (RLIMIT_AS);
- processes: how many more tasks (processes and threads) its user may run than it runs now (RLIMIT_NPROC;
  the kernel does not apply it to root, which is why a grader running as root gives each kernel a uid);
- file size: the largest file it may write (RLIMIT_FSIZE), and no core dumps.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys


def running_tasks(uid: int) -> int:
    """Processes and threads that `uid` runs now, as far as this /proc shows (a sandbox sees only its own)."""
    tasks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                tasks += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:  # the process exited meanwhile
            continue
    return tasks


def confine(uid: int | None, memory: int, processes: int, file_size: int) -> None:
    """Drop to `uid` (when given) and set the limits on this process, so that its exec inherits them."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    me = os.getuid()
    for limit, value in [
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_NPROC, running_tasks(me) + processes),
        (resource.RLIMIT_FSIZE, file_size),
        (resource.RLIMIT_CORE, 0),
    ]:
        resource.setrlimit(limit, (value, value))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="confine.py")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--cwd", help="folder to start in (entered after dropping to --uid, which owns it)")
    parser.add_argument("--memory", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--file-size", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run after --")
    confine(args.uid, args.memory, args.processes, args.file_size)
    if args.cwd:
        os.chdir(args.cwd)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
