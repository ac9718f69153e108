"""What runs beside a submission: in the learner's kernel (the grader sends this file's functions there as
source, `KERNEL_SOURCE`) and in this process for `check`.

These functions only report facts and move data; every judgement is made by the grader. Each is
self-contained (its imports inside) because the kernel receives its source, not this module.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

FOLDER = "__mvae_folder__"  # a case argument {FOLDER: {relative path: text or uint8 bytes}} arrives as a Path


def function_info(fn: Any) -> dict[str, Any]:
    """Where a submitted function comes from: its module, qualified name and code file, whether that code
    is the package's own, and the objects and attribute names its code refers to."""
    import os
    import types

    import mvae_course

    package = os.path.dirname(os.path.abspath(mvae_course.__file__)) + os.sep
    target = getattr(fn, "func", fn)  # a functools.partial: the function inside it
    code = getattr(target, "__code__", None)
    filename = str(getattr(code, "co_filename", ""))
    names: set[str] = set()
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:  # the function's own code and the code of every function defined inside it
        c = stack.pop()
        names.update(c.co_names)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]

    def qualified(obj: Any) -> str:
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"

    scope = getattr(target, "__globals__", {})
    referred = [scope.get(name) for name in names]
    referred += [cell.cell_contents for cell in getattr(target, "__closure__", None) or () if cell_has(cell)]
    references = set()
    for obj in referred:
        if isinstance(obj, types.ModuleType):  # module.attribute: the attribute names are in co_names too
            references.update(qualified(getattr(obj, a)) for a in names if callable(getattr(obj, a, None)))
        elif callable(obj):
            references.add(qualified(obj))
    return {
        "module": str(getattr(target, "__module__", "")),
        "qualname": str(getattr(target, "__qualname__", type(target).__qualname__)),
        "filename": filename,
        "package_code": bool(filename) and os.path.abspath(filename).startswith(package),
        "references": sorted(references),
        "attributes": sorted(n for n in names if n not in scope),  # co_names mixes globals and attributes
    }


def cell_has(cell: Any) -> bool:
    """Whether a closure cell holds a value (an empty one raises on access)."""
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


def rebuild(arg: Any, where: str | Path) -> Any:
    """A case argument as the submission receives it: a described folder is written under `where`."""
    from pathlib import Path

    if not (isinstance(arg, dict) and "__mvae_folder__" in arg):
        return arg
    root = Path(where)
    root.mkdir(parents=True, exist_ok=True)
    for name, content in arg["__mvae_folder__"].items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content.numpy().tobytes())
    return root


# Sent to the kernel, which defines these functions in a namespace of their own after the notebook ran.
KERNEL_SOURCE = "from __future__ import annotations\n\n" + "\n\n".join(
    inspect.getsource(f) for f in (function_info, cell_has, rebuild)
)
