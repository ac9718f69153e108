"""Is the answer the learner's own? An answer that imports, calls or copies the package's implementation
of what its question asks for scores 0 on that question, with a message that says why.

Two independent looks, both judged here, in the grader's process:

- the submitted notebook's code, statically (`static_problem`): the question's function, and every
  notebook function it calls, may not refer to a forbidden object (by an import, an alias or an attribute
  chain such as `obj.kl_normal`), and no statement may read such an object's source (`inspect.getsource`),
  take its code object (`__code__`) or `exec` it;
- the function object the kernel hands back (`dynamic_problem`, on `kernel.function_info`): it may not be a
  package object, its code may not be the package's, and the objects its code refers to may not be
  forbidden.

Each question names its forbidden objects by their canonical dotted path, the module that defines them and
their qualified name ("mvae_course.objectives.kl_normal"), so naming one imports nothing. A method
("mvae_course.models.mvae.MultimodalVAE.generate_text") is matched by its attribute name, since
`model.generate_text(...)` cannot be resolved without running the code.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PACKAGE = "mvae_course"
SOURCE_READERS = {"inspect.getsource", "inspect.getsourcelines", "inspect.getsourcefile", "inspect.getfile",
                  "dis.dis", "marshal.dumps", "exec", "eval", "compile"}
CODE_ATTRIBUTES = {"__code__", "__wrapped__", "__func__"}


@functools.cache
def resolve(dotted: str) -> Any:
    """The object a dotted path names (a module, or attributes below the longest importable module)."""
    module, inside = split(dotted)
    obj = importlib.import_module(module)
    for attr in inside.split(".") if inside else ():
        obj = getattr(obj, attr)
    return obj


@functools.cache
def split(dotted: str) -> tuple[str, str]:
    """(module, qualified name inside it) of a dotted path, found without importing the module itself
    (only its parent packages), so naming a forbidden object costs nothing."""
    parts = dotted.split(".")
    module = parts[0]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"no module named {module!r} (in {dotted!r})")
    for i in range(1, len(parts)):
        spec = importlib.util.find_spec(module)
        candidate = f"{module}.{parts[i]}"
        if spec.submodule_search_locations is None or importlib.util.find_spec(candidate) is None:
            return module, ".".join(parts[i:])
        module = candidate
    return module, ""


def qualified(obj: Any) -> str:
    """module.qualname of a function or class: the name `kernel.function_info` reports."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def _method_name(dotted: str) -> str | None:
    """The attribute name of a forbidden method (a class attribute), else None."""
    inside = split(dotted)[1]
    return inside.rsplit(".", 1)[1] if "." in inside else None


def dynamic_problem(info: dict[str, Any], function: str, forbidden: Sequence[str]) -> str | None:
    """Why the kernel's report on the submitted function shows the package's code, or None."""
    if str(info.get("module", "")).split(".")[0] == PACKAGE:
        return f"`{function}` is {info['module']}.{info.get('qualname', '')}, the package's own function, not yours"
    if info.get("package_code"):
        return f"`{function}` runs the package's own code (from {info.get('filename')}), not yours"
    references, attributes = set(info.get("references", ())), set(info.get("attributes", ()))
    for dotted in forbidden:
        if dotted in references or _method_name(dotted) in attributes:
            return f"`{function}` calls {dotted}, which already implements what this question asks you to write"
    return None


# --- the notebook's code ------------------------------------------------------------------------------


def notebook_code(cells: Sequence[Any]) -> list[str]:
    """The source of each code cell of a notebook ("" for other cells, so indices stay cell numbers)."""
    return [cell.source if cell.cell_type == "code" else "" for cell in cells]


def _parse(source: str) -> ast.Module | None:
    """A cell's code, IPython magics and shell lines left out; None when it is not valid Python."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _chain(node: ast.AST) -> list[str] | None:
    """["obj", "kl_normal"] for obj.kl_normal; None when the expression is not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


@dataclass
class _Notebook:
    """Names bound at the notebook's top level: imports and aliases (dotted paths) and definitions."""

    aliases: dict[str, str] = field(default_factory=dict)
    definitions: dict[str, ast.AST] = field(default_factory=dict)
    star_modules: list[str] = field(default_factory=list)
    statements: list[tuple[int, ast.stmt]] = field(default_factory=list)  # (cell number, statement)

    @classmethod
    def read(cls, cells: Sequence[str]) -> _Notebook:
        nb = cls()
        for number, source in enumerate(cells, 1):
            tree = _parse(source) if source.strip() else None
            for statement in _top_level(tree.body if tree else []):
                nb.statements.append((number, statement))
                nb._bind(statement)
        return nb

    def _bind(self, statement: ast.stmt) -> None:
        if isinstance(statement, ast.Import):
            for a in statement.names:
                self._set(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0])
        elif isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
            for a in statement.names:
                if a.name == "*":
                    self.star_modules.append(statement.module)
                else:
                    self._set(a.asname or a.name, f"{statement.module}.{a.name}")
        elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._set(statement.name, None, statement)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    chain = _chain(statement.value)
                    dotted = self.dotted(chain) if chain else None
                    self._set(target.id, dotted, None if dotted else statement.value)

    def _set(self, name: str, dotted: str | None, node: ast.AST | None = None) -> None:
        self.aliases.pop(name, None)
        self.definitions.pop(name, None)
        if dotted:
            self.aliases[name] = dotted
        if node is not None:
            self.definitions[name] = node

    def dotted(self, chain: list[str]) -> str | None:
        """The dotted path a name chain refers to through the notebook's imports, or None."""
        head, rest = chain[0], chain[1:]
        if head in self.aliases:
            return ".".join([self.aliases[head], *rest])
        if head not in self.definitions:
            for module in self.star_modules:
                try:
                    if hasattr(resolve(module), head):
                        return ".".join([module, head, *rest])
                except (ImportError, AttributeError):
                    continue
        return None


def _top_level(body: Sequence[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at the notebook's top level, including those inside if/for/while/with/try blocks."""
    for statement in body:
        yield statement
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        blocks = [getattr(statement, name, []) for name in ("body", "orelse", "finalbody")]
        blocks += [handler.body for handler in getattr(statement, "handlers", [])]
        for block in blocks:
            yield from _top_level(block)


@dataclass
class _Uses:
    """What a piece of code refers to: dotted paths, attribute names, and notebook functions it calls."""

    dotted: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)


def _uses(nb: _Notebook, roots: Sequence[ast.AST]) -> _Uses:
    """Everything `roots` refer to, following calls into other notebook definitions."""
    uses, seen, stack = _Uses(), set(), list(roots)
    while stack:
        node = stack.pop()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute):
                uses.attributes.add(sub.attr)
            chain = _chain(sub) if isinstance(sub, (ast.Name, ast.Attribute)) else None
            if not chain:
                continue
            dotted = nb.dotted(chain)
            if dotted:
                uses.dotted.add(dotted)
            elif chain[0] in nb.definitions and chain[0] not in seen:
                seen.add(chain[0])
                stack.append(nb.definitions[chain[0]])
    return uses


def _forbidden_use(uses: _Uses, forbidden: Sequence[str]) -> str | None:
    """The first forbidden object among `uses`: paths resolved to the object they name, then compared by
    its canonical module.qualname (so a re-export or an alias counts too)."""
    roots = {f.split(".")[0] for f in forbidden} | {PACKAGE}
    for dotted in sorted(uses.dotted):
        if dotted in forbidden:
            return dotted
        if dotted.split(".")[0] not in roots:
            continue
        try:
            name = qualified(resolve(dotted))
        except Exception:  # a name the code uses but that does not exist (the code would fail anyway)
            continue
        if name in forbidden:
            return name
    for f in forbidden:
        if _method_name(f) in uses.attributes:
            return f
    return None


def _reads_code(nb: _Notebook, node: ast.AST) -> bool:
    """Whether `node` reads source or code objects, or runs code from a string."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in CODE_ATTRIBUTES:
            return True
        if isinstance(sub, ast.Call):
            chain = _chain(sub.func)
            if chain and ((nb.dotted(chain) or ".".join(chain)) in SOURCE_READERS):
                return True
    return False


def static_problem(cells: Sequence[str], function: str, forbidden: Sequence[str]) -> str | None:
    """Why the notebook's code makes `function` the package's implementation, or None."""
    nb = _Notebook.read(cells)
    for number, statement in nb.statements:
        if _reads_code(nb, statement):
            used = _forbidden_use(_uses(nb, [statement]), forbidden)
            if used:
                return f"cell {number} copies {used} (reads its source or code object): write `{function}` yourself"
    dotted = nb.dotted([function])  # an import or alias of the name itself, or a star import that brings it
    if dotted and (dotted.split(".")[0] == PACKAGE or _forbidden_use(_Uses({dotted}), forbidden)):
        return f"`{function}` is imported ({dotted}), not written: write it yourself"
    if function not in nb.definitions:
        return None
    uses = _uses(nb, [nb.definitions[function]])
    used = _forbidden_use(uses, forbidden)
    if used:
        return f"`{function}` uses {used}, which already implements what this question asks you to write"
    if _reads_code(nb, nb.definitions[function]) and any(d.split(".")[0] == PACKAGE for d in uses.dotted):
        return f"`{function}` reads the package's source or code objects: write it yourself"
    return None
