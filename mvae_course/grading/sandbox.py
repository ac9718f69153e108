"""Where a submission's kernel runs: a bubblewrap sandbox under resource limits, or the limits alone.

With bubblewrap (`bwrap`, Debian package `bubblewrap`), each kernel gets
- its own file system view: read-only /usr, interpreter, virtualenv and `mvae_course` package, and nothing
  else of the instructor's: no solutions/, no other submission, no gradebook. Its one writable place is a
  private folder holding its copy of the notebook, plus a private /tmp of bounded size;
- its own PID namespace (it sees and signals only its own processes, which all die with it, and with the
  grader: --die-with-parent), IPC and UTS namespaces, and no network: an empty network namespace. It talks
  to the grader over unix sockets in its folder (ZeroMQ's ipc transport), which reach across network
  namespaces where TCP on loopback would not;
- the limits of confine.py (memory, processes, file size), and its own uid when the grader runs as root
  (root is exempt from the process limit). The grader kills the whole sandbox at its deadlines.

Without bwrap, or where it cannot create namespaces, a kernel still gets the limits, a clean environment,
its own folder and the deadlines (its process group is killed), and the grader warns once that
submissions are not isolated: a hostile one can then read and write whatever the grader's user can,
and a process that leaves its process group outlives grading (unless it runs under a uid of its own).

Left to the operating system even with bwrap: disk use in the kernel's folder (files of up to
`file_size` each, until the deadline: there is no quota), CPU time (bounded by the deadlines only), and
the Linux kernel's own attack surface (namespaces are not a virtual machine; no seccomp filter).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from traitlets import Integer, Type, default

import mvae_course

PACKAGE = Path(mvae_course.__file__).resolve().parent
CONFINE = Path(__file__).resolve().with_name("confine.py")
UID_BASE = 2**31 - 2**16  # kernels' own uids when the grader is root: far from accounts and subuid ranges
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "passwd", "group", "fonts")
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # symlinks into /usr on merged-/usr systems
_PASSED_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass(frozen=True)
class Limits:
    """What one submission's kernel may use."""

    memory: int = 8 * 2**30  # bytes of address space per process (torch alone maps about 3 GB)
    processes: int = 256  # tasks (processes and threads) beyond those its user already runs
    file_size: int = 64 * 2**20  # bytes of the largest file it may write
    tmp_size: int = 256 * 2**20  # bytes of its private /tmp (with bwrap)
    output: int = 2**20  # characters of cell output the grader keeps per notebook
    message: int = 8 * 2**20  # bytes of one message from the kernel; a bigger one is dropped unread
    result: int = 64 * 2**20  # bytes of one result file the grader reads back


@dataclass(frozen=True)
class Confinement:
    """How kernels are confined on this machine (see `confinement`)."""

    bwrap: bool  # each kernel in its own bubblewrap sandbox
    own_uids: bool  # each kernel under a uid of its own (the grader runs as root)
    missing: str = ""  # what is not isolated, and why, for the warning

    def warning(self) -> str:
        """The one warning for grading without isolation."""
        return (f"submissions are not isolated ({self.missing}): each can read and change what the grader's "
                "user can, and signal its processes; only the resource limits and deadlines apply")

    def describe(self) -> str:
        """One line for the gradebook, e.g. "bubblewrap sandbox, a uid per kernel"."""
        how = "bubblewrap sandbox" if self.bwrap else "no sandbox (resource limits only)"
        uids = ", a uid per kernel" if self.own_uids else ""
        return how + uids + (f": {self.missing}" if self.missing else "")


class SandboxError(RuntimeError):
    """The sandbox the grader was asked for cannot run here."""


class SandboxWarning(UserWarning):
    """Submissions are graded without the sandbox: they are not isolated."""


@functools.lru_cache(maxsize=None)
def confinement(mode: str = "auto") -> Confinement:
    """Find out, once per mode, how kernels can be confined here: "auto" (bwrap when it runs), "bwrap"
    (bwrap or SandboxError) or "none" (limits only). Each candidate is tried by starting Python in it."""
    if mode not in ("auto", "bwrap", "none"):
        raise ValueError(f"sandbox mode {mode!r}: choose auto, bwrap or none")
    root = os.geteuid() == 0
    problem = "the sandbox was turned off" if mode == "none" else _try(True, root)
    if problem is None:
        return Confinement(bwrap=True, own_uids=root)
    if mode == "bwrap":
        raise SandboxError(f"{problem}; install bubblewrap (apt-get install bubblewrap), "
                           "or grade with --sandbox auto")
    own_uids = root and _try(False, True) is None
    if root and not own_uids:
        problem += "; as root without bwrap the kernels run as root, with no process limit"
    return Confinement(bwrap=False, own_uids=own_uids, missing=problem)


def _try(bwrap: bool, own_uid: bool) -> str | None:
    """None when a kernel's Python starts and imports what a kernel needs, confined this way; else why not."""
    if bwrap and shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    uid = free_uids(1)[0] if own_uid else None
    with KernelBox(Confinement(bwrap, own_uid), Limits(), uid) as box:
        command = box.command([sys.executable, "-c", "import ipykernel, mvae_course"])
        try:
            done = subprocess.run(command, env=box.environment(), cwd=box.work, capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{'bwrap' if bwrap else 'a kernel'} cannot start here ({err})"
    if done.returncode == 0:
        return None
    last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
    return f"{'bwrap' if bwrap else 'a kernel under its own uid'} cannot run here ({last[:200]})"


def free_uids(n: int) -> list[int]:
    """`n` uids with no account and no running process, for kernels of a grader running as root."""
    busy = {_owner(pid) for pid in _pids()}
    uids: list[int] = []
    uid = UID_BASE
    while len(uids) < n:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in busy:
                uids.append(uid)
        uid += 1
    return uids


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _owner(pid: int) -> int | None:
    """The real uid of a live (not zombie) process, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith("Z"):
        return None
    return int(fields["Uid"].split()[0])


def kill_user(uid: int, rounds: int = 100) -> None:
    """SIGKILL every process of `uid` (a kernel's own uid), again until none is left: a fork bomb cannot
    outrun it, since a killed process forks no more and the process limit bounds the rest."""
    for _ in range(rounds):
        pids = [pid for pid in _pids() if _owner(pid) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


class KernelBox:
    """One kernel's confinement: its folders, the command and environment that start it, and kill().

    root/in   written by the grader (connection file, test inputs); read-only for the kernel
    root/work the kernel's own: its cwd and HOME, its copy of the notebook, its sockets, its results
    """

    def __init__(self, confinement: Confinement, limits: Limits, uid: int | None) -> None:
        self.confinement, self.limits, self.uid = confinement, limits, uid
        self.root = Path(tempfile.mkdtemp(prefix="mvae-grade-", dir=_box_parent()))
        self.inbox, self.work = self.root / "in", self.root / "work"
        self.inbox.mkdir()
        self.work.mkdir(mode=0o700)
        if uid is not None:  # the kernel's uid owns work/ and may read in/; nobody else may list either
            os.chmod(self.root, 0o711)
            os.chown(self.work, uid, uid)
            os.chown(self.inbox, -1, uid)
            os.chmod(self.inbox, 0o750)
        self._pgid: int | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> KernelBox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def put(self, name: str, data: bytes) -> Path:
        """Write a file the kernel may read (and not change)."""
        path = self.inbox / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.share(path)
        return path

    def share(self, path: Path) -> None:
        """Let the kernel's uid read a file the grader wrote in in/ (e.g. the 0600 connection file)."""
        if self.uid is not None:
            os.chown(path, -1, self.uid)
            os.chmod(path, 0o640)

    def take(self, name: str) -> bytes | None:
        """The bytes of a file the kernel wrote in work/, or None when there is none. Raises ValueError
        when it is not a plain file (a link, a pipe, a folder) or is larger than limits.result."""
        try:
            fd = os.open(self.work / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ValueError(f"its result file could not be opened ({err.strerror}): "
                             "not a plain file") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("its result is not a plain file")
            if info.st_size > self.limits.result:
                raise ValueError(f"its result file is larger than {self.limits.result} bytes")
            return f.read(self.limits.result + 1)

    def command(self, kernel: list[str]) -> list[str]:
        """`kernel` wrapped: bwrap (when used), then confine.py with the limits and uid, then the kernel."""
        lim = self.limits
        confine = [sys.executable, "-I", "-S", str(CONFINE), "--memory", str(lim.memory),
                   "--processes", str(lim.processes), "--file-size", str(lim.file_size),
                   "--cwd", str(self.work)]
        if self.uid is not None:
            confine += ["--uid", str(self.uid)]
        confine += ["--", *kernel]
        return (self._bwrap() if self.confinement.bwrap else []) + confine

    def _bwrap(self) -> list[str]:
        args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
                "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "grader"]
        if os.geteuid() == 0:  # bwrap keeps root's capabilities; confine.py needs only these to drop them
            args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-user"] + (["--disable-userns"] if _bwrap_knows("--disable-userns") else [])
        args += ["--ro-bind", "/usr", "/usr"]
        for name in _ROOT_LINKS:
            path = Path("/", name)
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        for name in _ETC:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        size = ["--size", str(self.limits.tmp_size)] if _bwrap_knows("--size") else []  # bwrap >= 0.7
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", *size, "--tmpfs", "/tmp"]
        made = {Path("/"), Path("/usr"), Path("/tmp"), Path("/etc"), Path("/proc"), Path("/dev")}
        bound: list[Path] = [Path("/usr")]
        for path, flag in [(p, "--ro-bind") for p in _read_only_paths()] + [
            (self.inbox, "--ro-bind"), (self.work, "--bind")
        ]:
            if flag == "--ro-bind" and any(path.is_relative_to(b) for b in bound):
                continue
            for parent in reversed(path.parents):
                if parent not in made:  # bwrap would make missing parents 0700, closed to the kernel's uid
                    args += ["--perms", "0755", "--dir", str(parent)]
                    made.add(parent)
            args += [flag, str(path), str(path)]
            made.add(path)
            bound.append(path)
        return args

    def environment(self) -> dict[str, str]:
        """The kernel's whole environment: nothing of the grader's beyond the locale."""
        home = str(self.work)
        env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
        env.update({
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": home, "TMPDIR": "/tmp" if self.confinement.bwrap else home,
            "PYTHONPATH": str(PACKAGE.parent), "PYTHONNOUSERSITE": "1",
            "MPLBACKEND": "Agg", "MPLCONFIGDIR": f"{home}/.matplotlib", "XDG_CACHE_HOME": f"{home}/.cache",
            "USER": "student", "LOGNAME": "student", "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        return env

    def started(self, pgid: int) -> None:
        """Record the process group of the kernel's first process (bwrap's, or the kernel's own)."""
        with self._lock:
            self._pgid = pgid

    def kill(self) -> None:
        """SIGKILL the kernel and everything it started: its process group (with bwrap, the whole PID
        namespace goes with it), and every process of its own uid. Safe from any thread, and repeatable."""
        with self._lock:
            if self._closed:
                return
            if self._pgid is not None:
                try:
                    os.killpg(self._pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if self.uid is not None:
                kill_user(self.uid)

    def close(self) -> None:
        """Kill what is left and delete the folders."""
        self.kill()
        with self._lock:
            self._closed = True
        shutil.rmtree(self.root, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _bwrap_knows(option: str) -> bool:
    """Whether this bwrap has `option` (older ones lack --size and --disable-userns)."""
    try:
        done = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in (done.stdout + done.stderr).split()


def _box_parent() -> str:
    """Where kernels' folders go: the temporary folder, unless its path is so long that the kernel's unix
    sockets in it would pass the 107 bytes a socket path may have (then /tmp)."""
    base = tempfile.gettempdir()
    return base if len(base) <= 60 else "/tmp"


def _read_only_paths() -> list[Path]:
    """What a kernel must read: the interpreter's installation, the virtualenv, its site-packages, and the
    `mvae_course` package itself (not the folder around it, which holds solutions/)."""
    paths = {Path(p) for p in (sys.base_prefix, sys.prefix, *site.getsitepackages())} | {PACKAGE}
    return sorted((p for p in paths if p.is_dir()), key=lambda p: len(p.parts))  # parents before children


class BoxedKernelClient(AsyncKernelClient):
    """A kernel client whose sockets drop any message larger than `max_message` bytes (ZMQ_MAXMSGSIZE)
    instead of reading it into the grader's memory."""

    max_message = Integer(Limits.message)

    @default("context")
    def _context_default(self) -> zmq.asyncio.Context:
        self._created_context = True
        context = zmq.asyncio.Context()
        context.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        return context


class BoxedKernelManager(AsyncKernelManager):
    """A python3 kernel started in a KernelBox and reached over unix sockets in its work folder. It is
    interrupted by a message (its process group is not the one bwrap starts in) and killed by the box."""

    client_factory = Type(BoxedKernelClient)

    def __init__(self, box: KernelBox, **kwargs: Any) -> None:
        super().__init__(kernel_name="python3", transport="ipc", ip=str(box.work / "kernel"),
                         connection_file=str(box.inbox / "kernel.json"), **kwargs)
        self.box = box

    @property
    def kernel_spec(self) -> Any:
        spec = super().kernel_spec
        if spec is not None:
            spec.interrupt_mode = "message"
        return spec

    def write_connection_file(self, **kwargs: Any) -> None:
        super().write_connection_file(**kwargs)
        self.box.share(Path(self.connection_file))

    def client(self, **kwargs: Any) -> BoxedKernelClient:
        return super().client(max_message=self.box.limits.message, **kwargs)  # type: ignore[return-value]

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        box = self.box
        kw.update(env=box.environment(), cwd=str(box.work), independent=True,
                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await super()._async_launch_kernel(box.command(kernel_cmd), **kw)
        assert self.provisioner is not None
        box.started(getattr(self.provisioner, "pgid", None) or self.provisioner.pid)
