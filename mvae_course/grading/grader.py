"""The autograder: run each submitted notebook in its own confined kernel, then judge its functions from here.

The grade command is taught in notebooks/00_setup.ipynb.

A submission cannot grade itself, nor touch anyone else's grade:
- Every kernel runs in a sandbox (sandbox.py: bubblewrap where it works, resource limits always) that sees
  none of the instructor's files but the package, and no other submission; cells and graded calls have
  deadlines, after which the kernel is interrupted, then killed with everything it started.
- After its cells have run (errors allowed), the grader draws fresh random inputs for every question in
  this process, asks the kernel to call the learner's function on them and save the results, and reads
  them back here (`weights_only=True`: plain tensors and numbers, no code). Every record is checked before
  it is judged: its structure, one output per test case, plain data only. Judging happens in this
  process with the package's reference implementations, so redefining `check`, patching `torch.load`, or
  the grading modules in the kernel changes nothing.
- A missing function, NotImplementedError, an exception, a timeout or a malformed record costs that
  question only; a notebook that cannot be read, or a grader failure, costs that notebook only. Every
  file passed is in the results, with the reason when it could not be graded.
- Text that comes from a submission (error messages, output values, file names) is escaped onto one line
  in the report, so it cannot pose as the grader's own lines.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import queue
import secrets
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat
import torch
import zmq
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbclient.util import run_sync

from mvae_course.grading.integrity import notebook_code
from mvae_course.grading.kernel import KERNEL_SOURCE
from mvae_course.grading.question import Question, Verdict, failed, verdict
from mvae_course.grading.registry import NOTEBOOKS
from mvae_course.grading.sandbox import (
    BoxedKernelManager, Confinement, KernelBox, Limits, SandboxWarning, confinement, free_uids,
)

METADATA_KEY = "mvae_course"  # notebook metadata: {"mvae_course": {"exercises": "01_elbo_exercises"}}
_CALL = "mvae_grading_call"  # metadata flag of the cells the grader adds, which get the call timeout
INTERRUPT_GRACE = 3  # seconds a kernel has to stop after an interrupt before it is killed
MAX_NOTEBOOK_BYTES = 16 * 2**20
MAX_TEXT = 300  # characters of submission text (an error message, a value) kept in feedback
_NOT_PLAIN = "returned something other than tensors, numbers, lists or tuples"

# Defined in the kernel after the notebook has run. It only moves data, and reports where the function
# comes from (grading/kernel.py, sent as source): the verdict is made in the grader. Each record is a dict
# whose keys are in RECORD_FIELDS; `describe` adds facts about the function itself.
_KERNEL_HELPER = f'''
import torch as _mvae_torch  # here, under the cell timeout, so that no graded call pays for the import
_mvae_kernel = {{}}
exec({KERNEL_SOURCE!r}, _mvae_kernel)
''' + '''

def _mvae_grading_call(function, inputs, outputs):
    import torch
    from pathlib import Path

    def rebuild(arg, where):
        if isinstance(arg, dict) and "__mvae_model__" in arg:
            from mvae_course.config import ModelConfig
            from mvae_course.models.mvae import MultimodalVAE

            model = MultimodalVAE(ModelConfig(**arg["__mvae_model__"]))
            model.load_state_dict(arg["state_dict"])
            return model.eval()
        return _mvae_kernel["rebuild"](arg, where)  # a described folder is written under `where`

    def describe(fn):
        return {"info": _mvae_kernel["function_info"](fn)}

    fn = globals().get(function)
    case = 0
    if not callable(fn):
        record = {"error": "missing"}
    else:
        record = describe(fn)
        try:
            results = []
            for case, args in enumerate(torch.load(inputs, weights_only=True)):
                where = Path(outputs).parent / f"{function}-{case}"  # the kernel's own writable folder
                results.append(fn(*[rebuild(a, where / str(i)) for i, a in enumerate(args)]))
            record["outputs"] = results
        except NotImplementedError:
            record["error"] = "not_implemented"
        except Exception as err:
            record.update(error="exception", message=f"{type(err).__name__}: {err}"[:2000], case=case)
    try:
        torch.save(record, outputs)
    except Exception as err:
        torch.save({"error": "unsaveable", "message": f"{type(err).__name__}: {err}"[:2000]}, outputs)
'''

_ERRORS = ("missing", "not_implemented", "exception", "unsaveable")
# Every key a kernel's record may carry, and the test its value must pass; other keys are ignored.
RECORD_FIELDS: dict[str, Callable[[Any], bool]] = {
    "error": lambda v: type(v) is str and v in _ERRORS,
    "message": lambda v: isinstance(v, str),
    "case": lambda v: type(v) is int and v >= 0,
    "outputs": lambda v: type(v) is list,
    "info": lambda v: _valid_info(v),
}


def _valid_info(info: Any) -> bool:
    """What `kernel.function_info` reports: strings, a bool, and lists of strings (a forged one can only
    fail to hide a package import that the notebook's own code shows anyway)."""
    strings = ("module", "qualname", "filename")
    lists = ("references", "attributes")
    return (type(info) is dict and set(info) <= {*strings, *lists, "package_code"}
            and all(type(info.get(k, "")) is str for k in strings)
            and type(info.get("package_code", False)) is bool
            and all(type(info.get(k, [])) is list and all(type(x) is str for x in info.get(k, [])) for k in lists))
_MAX_DEPTH, _MAX_ITEMS, _MAX_ELEMENTS = 8, 10_000, 10**7  # of one record's outputs


@dataclass
class NotebookGrade:
    """The grade of one submitted file. `problem` says why it could not be graded at all (then every
    question of its exercise set, when known, has 0 points)."""

    path: str
    notebook: str
    seed: int
    verdicts: list[Verdict]
    cell_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the grader did to the kernel, e.g. stopped it
    problem: str | None = None
    seconds: float = 0.0

    @property
    def points(self) -> float:
        return sum(v.points for v in self.verdicts)

    @property
    def max_points(self) -> float:
        return sum(v.max_points for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "notebook": self.notebook, "seed": self.seed, "points": self.points,
            "max_points": self.max_points, "questions": [v.to_dict() for v in self.verdicts],
            "cell_errors": self.cell_errors, "notes": self.notes, "problem": self.problem,
            "seconds": round(self.seconds, 1),
        }


def identify(nb: nbformat.NotebookNode, path: Path) -> str:
    """Which exercise notebook this is: from its metadata, else from its file name."""
    meta = nb.metadata.get(METADATA_KEY)
    name = meta.get("exercises") if isinstance(meta, dict) else None
    if name in NOTEBOOKS:
        return name
    return _identify_by_name(path) or _unidentified(path)


def _identify_by_name(path: Path) -> str | None:
    for name in NOTEBOOKS:
        if name in path.name or name.removesuffix("_exercises") in path.name:
            return name
    return None


def _unidentified(path: Path) -> str:
    raise ValueError(
        f"{path}: cannot tell which exercise notebook this is. Its metadata has no "
        f"{METADATA_KEY}.exercises entry and its name contains none of {', '.join(NOTEBOOKS)}; "
        "submit the notebook you were given (from exercises/), keeping its name"
    )


@dataclass
class Submission:
    """A file passed to the grader, read once before any kernel starts (so no kernel can change it)."""

    path: Path
    raw: bytes = b""
    nb: nbformat.NotebookNode | None = None
    notebook: str = ""  # the exercise set, when known
    problem: str | None = None


def read_submission(path: str | Path) -> Submission:
    """Read and identify one file; what is wrong with it goes in `problem` (never an exception)."""
    path = Path(path)
    sub = Submission(path, notebook=_identify_by_name(path) or "")
    if not path.is_file():
        sub.problem = f"{path}: no such notebook; pass the .ipynb files to grade"
        return sub
    if path.suffix != ".ipynb":
        sub.problem = f"{path}: not a notebook (.ipynb); submit the exercise notebook itself"
        return sub
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        sub.problem = f"{path}: larger than {MAX_NOTEBOOK_BYTES // 2**20} MB; clear its outputs and resubmit"
        return sub
    sub.raw = path.read_bytes()
    try:
        nb = nbformat.reads(sub.raw.decode("utf-8"), as_version=4)
        nbformat.validate(nb)
    except Exception as err:
        sub.problem = f"{path}: not a valid notebook ({one_line(f'{type(err).__name__}: {err}', 200)})"
        return sub
    try:
        sub.notebook = identify(nb, path)
    except ValueError as err:
        sub.problem = str(err)
        return sub
    sub.nb = nb
    return sub


def _portable(arg: Any) -> Any:
    """A case argument as plain data the kernel can load with weights_only=True (models by weights)."""
    if isinstance(arg, torch.nn.Module):
        return {"__mvae_model__": dataclasses.asdict(arg.config), "state_dict": arg.state_dict()}
    return arg


def _question_seed(seed: int, q: Question) -> int:
    return (seed ^ zlib.crc32(q.id.encode())) % 2**63


def one_line(text: str, limit: int = MAX_TEXT) -> str:
    """`text` as one line of printable characters (others escaped: a newline becomes \\n), at most `limit`
    long: how the grader shows anything a submission wrote."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell_errors(cells: list[nbformat.NotebookNode]) -> list[str]:
    errors = []
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                name, value = one_line(out.get("ename", ""), 80), one_line(out.get("evalue", ""))
                errors.append(f"cell {i + 1}: {name}: {value}")
    return errors


def _helper_failure(cell: nbformat.NotebookNode) -> str | None:
    """Why the grader's helper cell failed in the kernel (e.g. torch would not import), or None."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            error = f"{one_line(out.get('ename', ''), 80)}: {one_line(out.get('evalue', ''))}"
            return f"the grader's helper could not run in this kernel ({error})"
    return None


def _check_outputs(value: Any, depth: int = 0, counts: list[int] | None = None) -> str | None:
    """None when `value` is plain data of bounded size (tensors, numbers, strings and None, in lists,
    tuples and dicts with string keys), else what is wrong with it."""
    counts = [0, 0] if counts is None else counts  # items, tensor elements
    counts[0] += 1
    if depth > _MAX_DEPTH or counts[0] > _MAX_ITEMS:
        return f"is nested deeper than {_MAX_DEPTH} or holds more than {_MAX_ITEMS} items"
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            return "holds a tensor that is not a plain CPU tensor"
        counts[1] += value.numel()
        return f"holds more than {_MAX_ELEMENTS} numbers" if counts[1] > _MAX_ELEMENTS else None
    if value is None or type(value) in (bool, int, float, str):
        return None
    items: list[Any]
    if type(value) in (list, tuple):
        items = list(value)
    elif type(value) is dict and all(type(k) is str for k in value):
        items = list(value.values())
    else:
        return f"holds a {type(value).__name__}, which is not plain data"
    for item in items:
        problem = _check_outputs(item, depth + 1, counts)
        if problem:
            return problem
    return None


def check_record(record: Any, cases: int) -> str | None:
    """None when `record` (read from a kernel) is well formed for `cases` test cases, else why not."""
    if type(record) is not dict:
        return f"is a {type(record).__name__}, not the grader's record"
    for key, valid in RECORD_FIELDS.items():
        if key in record and not valid(record[key]):
            return f"has an invalid {key!r} entry"
    if "error" in record:
        needs = {"exception": ("message", "case"), "unsaveable": ("message",)}.get(record["error"], ())
        missing = [key for key in needs if key not in record]
        return f"has no {missing[0]!r} entry" if missing else None
    if "outputs" not in record:
        return "has neither outputs nor an error"
    if len(record["outputs"]) != cases:
        return f"has {len(record['outputs'])} outputs for {cases} test cases"
    problem = _check_outputs(record["outputs"])
    return f"output {problem}" if problem else None


class _GradingClient(NotebookClient):
    """nbclient with the grader's guards: a cell past its timeout is interrupted and, when it has not
    stopped `INTERRUPT_GRACE` seconds later, reported by `stuck` (the caller kills the kernel); cell
    output beyond `output_limit` characters is dropped; error outputs are kept, shortened; a channel that
    ZeroMQ closed on a message too large to read is opened again (`reconnect_dropped`)."""

    def __init__(self, nb: nbformat.NotebookNode, output_limit: int, **kwargs: Any) -> None:
        super().__init__(nb, iopub_timeout=INTERRUPT_GRACE, **kwargs)
        self.output_left = output_limit
        self.output_dropped = self.message_dropped = self.stuck = False
        self._watched: list[tuple[zmq.Socket, str, zmq.Socket]] | None = None

    def reconnect_dropped(self) -> None:
        """Reopen the shell or iopub connection if ZMQ_MAXMSGSIZE closed it (libzmq does not reconnect
        after that): the oversized message is lost, later ones arrive again."""
        assert self.kc is not None
        if self._watched is None:
            self._watched = []
            for name in ("shell", "iopub"):
                socket = getattr(self.kc, f"{name}_channel").socket
                monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                self._watched.append((socket, self.kc._make_url(name), zmq.Socket.shadow(monitor.underlying)))
        reopened = False
        for socket, url, monitor in self._watched:
            if monitor.poll(0):
                while monitor.poll(0):
                    monitor.recv_multipart()
                with contextlib.suppress(zmq.ZMQError):
                    socket.disconnect(url)
                socket.connect(url)
                self.message_dropped = reopened = True
        if reopened:
            # iopub subscribes again only once the connection is made: until then the kernel's output is lost.
            # Wait, as at the kernel's start, for a kernel_info reply and an iopub message after it.
            with contextlib.suppress(RuntimeError):  # a kernel that does not answer fails the next cell
                run_sync(self.kc.wait_for_ready)(timeout=INTERRUPT_GRACE)

    async def _async_handle_timeout(self, timeout: int, cell: Any = None) -> Any:
        self.stuck = True  # until the kernel reports idle within the grace period
        return await super()._async_handle_timeout(timeout, cell)

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            self.stuck = False
        return super().process_message(msg, cell, cell_index)

    def output(self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int) -> Any:
        content = msg["content"]
        if msg["msg_type"] == "error":
            content.update(ename=one_line(content.get("ename", ""), 80),
                           evalue=one_line(content.get("evalue", "")), traceback=[])
            return super().output(outs, msg, display_id, cell_index)
        self.output_left -= len(str(content))
        if self.output_left < 0:
            self.output_dropped = True
            return None
        return super().output(outs, msg, display_id, cell_index)


class _KernelSession:
    """The learner's kernel, after the notebook has run: calls one function on saved inputs."""

    def __init__(self, client: _GradingClient, box: KernelBox, timeout: float, code: list[str]) -> None:
        self.client, self.box, self.timeout, self.code = client, box, timeout, code
        self.dead: str | None = None

    def run(self, source: str, call: bool = True) -> float:
        """Execute `source` in the kernel (under the call timeout when `call`, else the cell timeout);
        returns the seconds it took. Raises DeadKernelError."""
        cells = self.client.nb.cells
        cells.append(nbformat.v4.new_code_cell(source, metadata={_CALL: call}))  # nbclient stores cells back
        return self.execute(len(cells) - 1)

    def execute(self, index: int) -> float:
        """Run cell `index`; a cell that ignores the interrupt at its timeout gets its kernel killed."""
        start = time.monotonic()
        self.client.stuck = False
        self.client.reconnect_dropped()
        self.client.execute_cell(self.client.nb.cells[index], index)
        self.client.reconnect_dropped()
        if self.client.stuck:
            self.box.kill()
            raise DeadKernelError("stuck")
        return time.monotonic() - start

    def grade(self, q: Question, seed: int) -> Verdict:
        if self.dead:
            return failed(q, self.dead)
        cases = q.cases(torch.Generator().manual_seed(_question_seed(seed, q)))
        buffer = io.BytesIO()
        torch.save([tuple(_portable(a) for a in case) for case in cases], buffer)
        inputs, outputs = self.box.put(f"{q.id}.in.pt", buffer.getvalue()), self.box.work / f"{q.id}.out.pt"
        try:
            elapsed = self.run(f"_mvae_grading_call({q.function!r}, {str(inputs)!r}, {str(outputs)!r})")
        except DeadKernelError:
            if self.client.stuck:
                self.dead = f"the kernel was stopped when `{q.function}` ignored the interrupt at its timeout"
                return failed(q, f"`{q.function}` did not finish within {self.timeout} s and ignored the "
                                 "interrupt (an infinite loop?), so the kernel was stopped")
            self.dead = f"the kernel died while `{q.function}` ran, so no later question could be graded"
            return failed(q, f"the kernel died while `{q.function}` ran (it used too much memory, exited, "
                             "or ran past the notebook's deadline)")
        try:
            data = self.box.take(outputs.name)
        except ValueError as err:
            return failed(q, f"`{q.function}` could not be graded: {err}")
        if data is None:
            if elapsed >= self.timeout:
                return failed(q, f"`{q.function}` did not finish within {self.timeout} s (an infinite loop?)")
            return failed(q, f"`{q.function}` gave no result (the kernel was interrupted or busy)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's remarks on how a hostile file was pickled
                record = torch.load(io.BytesIO(data), weights_only=True)
        except Exception:
            return failed(q, f"`{q.function}` {_NOT_PLAIN}")
        problem = check_record(record, len(cases))
        if problem:
            return failed(q, f"`{q.function}` could not be graded: the result its kernel saved {problem}")
        return self._judge(q, cases, record)

    def _judge(self, q: Question, cases: list[Any], record: dict[str, Any]) -> Verdict:
        error = record.get("error")
        if error == "missing":
            return failed(q, f"no function named `{q.function}` is defined: keep the name from the exercise "
                             "and make sure its cell runs without errors")
        if error == "not_implemented":
            return failed(q, f"not attempted: `{q.function}` still raises NotImplementedError")
        if error == "exception":
            message, case = one_line(record["message"]), record["case"] + 1
            return failed(q, f"`{q.function}` raised {message} (on test case {case})")
        if error == "unsaveable":
            return failed(q, f"`{q.function}` {_NOT_PLAIN}")
        v = verdict(q, cases, record["outputs"], record.get("info"), self.code)
        v.feedback = one_line(v.feedback, 2 * MAX_TEXT)  # it may quote the submission's output
        return v


@dataclass(frozen=True)
class Deadlines:
    """Seconds allowed: each notebook cell, each graded function call, and the whole notebook."""

    cell: float = 60
    call: float = 60
    notebook: float = 900

    def __post_init__(self) -> None:
        for name in ("cell", "call", "notebook"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"the {name} timeout must be a positive number of seconds, got {value!r}")


def _grade_submission(sub: Submission, seed: int, deadlines: Deadlines, limits: Limits, conf: Confinement,
                      uid: int | None) -> NotebookGrade:
    """Grade one read submission in its own box; never raises."""
    start = time.monotonic()
    questions = NOTEBOOKS.get(sub.notebook, [])
    if sub.problem:
        reason = f"not graded: {one_line(sub.problem)}"
        return NotebookGrade(str(sub.path), sub.notebook, seed, [failed(q, reason) for q in questions],
                             problem=sub.problem)
    try:
        grade = _run_and_grade(sub, seed, deadlines, limits, conf, uid)
    except Exception as err:  # a grader failure on this submission costs this submission only
        problem = f"{sub.path}: the grader failed on it ({one_line(f'{type(err).__name__}: {err}')})"
        grade = NotebookGrade(str(sub.path), sub.notebook, seed,
                              [failed(q, f"not graded: {problem}") for q in questions], problem=problem)
    grade.seconds = time.monotonic() - start
    return grade


def _run_and_grade(sub: Submission, seed: int, deadlines: Deadlines, limits: Limits, conf: Confinement,
                   uid: int | None) -> NotebookGrade:
    assert sub.nb is not None
    nb, questions, submitted = sub.nb, NOTEBOOKS[sub.notebook], len(sub.nb.cells)
    notes: list[str] = []
    with KernelBox(conf, limits, uid) as box:
        fd = os.open(box.work / sub.path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # its own copy
        with os.fdopen(fd, "wb") as f:
            f.write(sub.raw)
        if uid is not None:
            os.chown(box.work / sub.path.name, uid, uid)
        client = _GradingClient(
            nb, limits.output, km=BoxedKernelManager(box), allow_errors=True, interrupt_on_timeout=True,
            timeout_func=lambda cell: deadlines.call if cell.metadata.get(_CALL) else deadlines.cell,
            error_on_timeout={"ename": "TimeoutError", "evalue": "the cell ran past its timeout",
                              "traceback": []},
        )
        overdue = threading.Event()

        def past_deadline() -> None:
            overdue.set()
            box.kill()

        late = f"the notebook ran past its {deadlines.notebook:g} s deadline, so its kernel was stopped"
        watchdog = threading.Timer(deadlines.notebook, past_deadline)
        watchdog.start()
        session = _KernelSession(client, box, deadlines.call, notebook_code(nb.cells[:submitted]))
        try:
            with client.setup_kernel(cleanup_kc=True):
                try:
                    for index in range(submitted):
                        session.execute(index)
                    session.run(_KERNEL_HELPER, call=False)
                    session.dead = _helper_failure(nb.cells[-1])
                except DeadKernelError:
                    session.dead = (
                        late if overdue.is_set()
                        else "the kernel was stopped: a cell ignored the interrupt at its timeout"
                        if client.stuck
                        else "the kernel died while the notebook ran (it used too much memory or exited)"
                    )
                verdicts = [session.grade(q, seed) for q in questions]
        except Exception:
            if not overdue.is_set():  # killed while starting: the deadline's doing, not the grader's failure
                raise
            verdicts = [failed(q, late) for q in questions]
        finally:
            watchdog.cancel()
        if overdue.is_set():
            notes.append(late)
        if client.output_dropped:
            notes.append(f"cell output beyond {limits.output} characters was not kept")
        if client.message_dropped:
            notes.append(f"a message of more than {limits.message} bytes from the kernel was dropped unread")
    errors = _cell_errors(nb.cells[:submitted])
    return NotebookGrade(str(sub.path), sub.notebook, seed, verdicts, errors, notes)


def grade_notebooks(
    paths: list[str | Path],
    seed: int | None = None,
    timeout: float = 60,
    call_timeout: float | None = None,
    jobs: int = 1,
    notebook_timeout: float = 900,
    sandbox: str = "auto",
    limits: Limits = Limits(),
) -> list[NotebookGrade]:
    """Grade files, each notebook in its own confined kernel, with one seed for the whole run; one result
    per path, in order, even for files that could not be graded (their `problem` says why).

    timeout: seconds for each of a notebook's cells; call_timeout: for each graded call (default: timeout);
    notebook_timeout: for the whole notebook. At a cell's timeout the kernel is interrupted, and killed if
    it has not stopped a few seconds later; at the notebook's, it is killed. jobs: kernels at once.
    sandbox: "auto" (bubblewrap where it works, else limits only, with a SandboxWarning), "bwrap"
    (SandboxError where it does not work) or "none".
    """
    deadlines = Deadlines(timeout, timeout if call_timeout is None else call_timeout, notebook_timeout)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    submissions = [read_submission(p) for p in paths]  # every file read before any kernel starts
    conf = confinement(sandbox)
    if conf.missing:
        warnings.warn(conf.warning(), SandboxWarning, stacklevel=2)
    seed = secrets.randbits(62) if seed is None else seed
    uids: queue.Queue[int | None] = queue.Queue()
    for uid in free_uids(jobs) if conf.own_uids else [None] * jobs:
        uids.put(uid)

    def grade(sub: Submission) -> NotebookGrade:
        uid = uids.get()
        try:
            return _grade_submission(sub, seed, deadlines, limits, conf, uid)
        finally:
            uids.put(uid)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(grade, submissions))


def grade_notebook(path: str | Path, seed: int | None = None, timeout: float = 60,
                   call_timeout: float | None = None, **kwargs: Any) -> NotebookGrade:
    """Grade one notebook (see grade_notebooks for the arguments)."""
    return grade_notebooks([path], seed, timeout, call_timeout, **kwargs)[0]


def _points(x: float) -> str:
    return f"{x:g}"


def format_report(grades: list[NotebookGrade]) -> str:
    """A per-question table with points and totals, one block per file. Everything that came from a
    submission is escaped onto its line, after the grader's own columns."""
    lines = []
    for g in grades:
        lines.append(f"{one_line(g.path, 500)}  ({g.notebook or 'unknown exercises'}, seed {g.seed})")
        if g.problem:
            lines.append(f"  not graded: {one_line(g.problem, 500)}")
        width = max([len(v.function) for v in g.verdicts], default=0)
        for v in g.verdicts:
            score = f"{_points(v.points)}/{_points(v.max_points)}"
            feedback = one_line(v.feedback, 2 * MAX_TEXT)
            lines.append(f"  {v.question:<4} {v.function:<{width}}  {score}  {feedback}")
        lines.append(f"  {'total':<{width + 5}}  {_points(g.points)}/{_points(g.max_points)}")
        lines += [f"  note: {one_line(n, 500)}" for n in g.notes + g.cell_errors]
        lines.append("")
    if len(grades) > 1:
        total, most = sum(g.points for g in grades), sum(g.max_points for g in grades)
        lines.append(f"all notebooks: {_points(total)}/{_points(most)}")
    return "\n".join(lines).rstrip() + "\n"


def _write_atomically(out: Path, text: str) -> None:
    """Replace `out` in one step: readers see the old file or the new one, never a part."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_gradebook(
    grades: list[NotebookGrade], out: str | Path, confined: Confinement | None = None
) -> None:
    """The results as JSON, for a gradebook, written atomically (call it once every kernel is gone)."""
    data = {
        "points": sum(g.points for g in grades),
        "max_points": sum(g.max_points for g in grades),
        "isolated": None if confined is None else confined.bwrap,
        "sandbox": None if confined is None else confined.describe(),
        "problems": [g.problem for g in grades if g.problem],
        "submissions": [g.to_dict() for g in grades],
    }
    _write_atomically(Path(out), json.dumps(data, indent=2) + "\n")


CSV_COLUMNS = (
    "path", "notebook", "seed", "question", "function", "points", "max_points", "passed", "feedback",
)


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_gradebook_csv(grades: list[NotebookGrade], out: str | Path) -> None:
    """One row per submission and question (one row with the reason for a file that has none), for an
    LMS import; written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for g in grades:
        rows = [(v.question, v.function, v.points, v.max_points, v.passed, v.feedback) for v in g.verdicts]
        for row in rows or [("", "", 0, 0, False, f"not graded: {g.problem}")]:
            writer.writerow([_cell(x) for x in (g.path, g.notebook, g.seed, *row)])
    _write_atomically(Path(out), buffer.getvalue())
