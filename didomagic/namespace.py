"""Which notebook names a cell reads, and which names it binds or deletes.

The cell is first turned into Python by IPython's own input transformer, so
``!ls``, ``%time x = f()`` and ``%%time`` cells are analysed as they will run.
Top-level statements are walked in evaluation order: a name loaded before the
cell has bound it is a *read* (its notebook value must travel); every name the
cell binds is a *write* (its value comes back). Bodies of functions, lambdas
and classes defined in the cell are resolved with :mod:`symtable`, which knows
Python's scoping rules exactly; a global they reference counts as read unless
the cell bound it before the definition, and a name they declare ``global``
and assign counts as written.

The analysis over-approximates where it cannot know (a global used by a
function that may run later): sending an unneeded value is harmless, a missing
one is not.
"""

from __future__ import annotations

import ast
import functools
import re
import string
import symtable
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from didomagic.errors import ConfigurationError

ANALYSED_KEPT = 64
"""Plain-Python cells whose analysis is kept (it is a function of the cell's text alone)."""

_CODE_MAGICS = {"time"}
"""Line and cell magics whose argument or body runs as code in the user namespace."""


@dataclass(frozen=True)
class CellNames:
    """The names a cell reads before binding, binds, and deletes."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    deletes: frozenset[str] = frozenset()


def transform_cell(cell: str) -> str:
    """Turn IPython syntax (magics, ``!cmd``, ``?``) into plain Python source."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell)


def analyze_cell(cell: str, transform: Callable[[str], str] = transform_cell) -> CellNames:
    """Analyse a notebook cell; a cell that does not parse reads and binds nothing.

    (It still runs remotely, where the kernel reports its syntax error.)
    """
    try:
        return _analyze_plain(cell)  # plain Python: IPython's transforms change nothing
    except (SyntaxError, ValueError):
        pass
    except (RecursionError, MemoryError):
        raise _too_deep() from None
    try:
        source = transform(cell)
    except Exception:
        return CellNames()
    return analyze_source(source)


@functools.lru_cache(maxsize=ANALYSED_KEPT)
def _analyze_plain(cell: str) -> CellNames:
    """The names of a plain-Python cell (kept: a notebook runs the same cells again)."""
    return _analyze_tree(ast.parse(cell))


def _too_deep() -> ConfigurationError:
    return ConfigurationError(
        "This cell nests expressions too deeply to analyse which names it reads and binds "
        "(for example a sum of a thousand terms written out). Write it flatter (sum([...])), "
        "or give the names yourself with --no-sync --push a,b --pull c."
    )


def analyze_source(source: str) -> CellNames:
    """Analyse plain Python source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return CellNames()
    except (RecursionError, MemoryError):
        raise _too_deep() from None
    return _analyze_tree(tree)


def _analyze_tree(tree: ast.Module) -> CellNames:
    visitor = _TopLevel()
    try:
        visitor.visit(tree)
    except RecursionError:
        raise _too_deep() from None
    return CellNames(
        frozenset(visitor.reads), frozenset(visitor.writes), frozenset(visitor.deletes)
    )


class _TopLevel(ast.NodeVisitor):
    """Walks module-level code in evaluation order."""

    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.reads: set[str] = set()
        self.writes: set[str] = set()
        self.deletes: set[str] = set()

    # -- primitives

    def load(self, name: str) -> None:
        if name not in self.bound:
            self.reads.add(name)

    def store(self, name: str) -> None:
        self.writes.add(name)
        self.bound.add(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.load(node.id)
        elif isinstance(node.ctx, ast.Store):
            self.store(node.id)
        else:  # del x: x must exist where the cell runs, and is gone afterwards
            self.load(node.id)
            self.deletes.add(node.id)
            self.bound.discard(node.id)

    # -- statements whose parts run in a different order than they are written

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self.load(node.target.id)
            self.store(node.target.id)
        else:
            self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.annotation)
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)
        elif not isinstance(node.target, ast.Name):
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.store(node.target.id)

    def _visit_for(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    visit_For = visit_AsyncFor = _visit_for

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self.store(node.name)
        for stmt in node.body:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.store(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self.store(alias.asname or alias.name)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self.store(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.store(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        for key in node.keys:
            self.visit(key)
        for pattern in node.patterns:
            self.visit(pattern)
        if node.rest:
            self.store(node.rest)

    # -- nested scopes

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in [*node.decorator_list, *_signature_exprs(node.args)]:
            self.visit(expr)
        if node.returns is not None:
            self.visit(node.returns)
        self._nested(node)
        self.store(node.name)

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._nested(node)
        self.store(node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for expr in _signature_exprs(node.args):
            self.visit(expr)
        self._nested(node)

    def _nested(self, node: ast.AST) -> None:
        """Account for the globals a function, lambda or class body uses and assigns."""
        table = symtable.symtable(ast.unparse(node), "<cell>", "exec")
        for child in _descendants(table):
            for sym in child.get_symbols():
                if not sym.is_global():
                    continue
                if sym.is_referenced():
                    self.load(sym.get_name())
                if sym.is_assigned():
                    self.writes.add(sym.get_name())

    def _visit_comprehension(
        self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp
    ) -> None:
        # The first iterable runs in the enclosing scope; the rest in the comprehension's
        # own scope, whose targets shadow module names.
        generators = node.generators
        self.visit(generators[0].iter)
        local = {
            n.id for gen in generators for n in ast.walk(gen.target) if isinstance(n, ast.Name)
        }
        inner = _Comprehension(self, local)
        for i, gen in enumerate(generators):
            if i:
                inner.visit(gen.iter)
            for cond in gen.ifs:
                inner.visit(cond)
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                inner.visit(getattr(node, part))

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _visit_comprehension

    # -- IPython magics that run code in the user namespace

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        for expr in _expanded_exprs(node):
            self.visit(expr)
        embedded = _magic_code(node)
        if embedded is not None:
            try:
                tree = ast.parse(embedded)
            except SyntaxError:
                return
            for stmt in tree.body:
                self.visit(stmt)


class _Comprehension(ast.NodeVisitor):
    """Visits the inside of a module-level comprehension."""

    def __init__(self, top: _TopLevel, local: set[str]) -> None:
        self.top = top
        self.local = local

    def visit_Name(self, node: ast.Name) -> None:
        if node.id not in self.local:
            self.top.load(node.id)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.top.store(node.target.id)  # a walrus binds in the enclosing (module) scope

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.top.visit_Lambda(node)

    def _visit_comprehension(self, node: ast.AST) -> None:
        local = set(self.local)
        local.update(
            n.id
            for gen in node.generators  # type: ignore[attr-defined]
            for n in ast.walk(gen.target)
            if isinstance(n, ast.Name)
        )
        inner = _Comprehension(self.top, local)
        for child in ast.iter_child_nodes(node):
            inner.visit(child)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _visit_comprehension


def _signature_exprs(args: ast.arguments) -> Iterator[ast.expr]:
    """Defaults and annotations: evaluated when the function is defined."""
    yield from args.defaults
    yield from (d for d in args.kw_defaults if d is not None)
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    yield from (a.annotation for a in every if a.annotation is not None)


def _descendants(table: symtable.SymbolTable) -> Iterator[symtable.SymbolTable]:
    for child in table.get_children():
        yield child
        yield from _descendants(child)


def _ipython_call(node: ast.Call) -> tuple[str, list[str]] | None:
    """``(method, string arguments)`` of a ``get_ipython().method('...', ...)`` call."""
    func = node.func
    if not (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
    ):
        return None
    args = node.args
    strings = [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if len(strings) != len(args):
        return None
    return func.attr, strings


_DOLLAR_NAME = re.compile(r"(?<!\$)\$([A-Za-z_]\w*)")


def _expanded_exprs(node: ast.Call) -> Iterator[ast.expr]:
    """Expressions IPython expands in ``!cmd`` and magic lines: ``{expr}`` and ``$name``."""
    call = _ipython_call(node)
    if call is None:
        return
    method, strings = call
    line_index = {"system": 0, "getoutput": 0, "run_line_magic": 1, "run_cell_magic": 1}
    index = line_index.get(method)
    if index is None or len(strings) <= index:
        return
    line = strings[index]
    for name in _DOLLAR_NAME.findall(line):
        yield ast.Name(name, ast.Load())
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(line) if f]
    except ValueError:
        return
    for field in fields:
        try:
            yield ast.parse(field, mode="eval").body
        except SyntaxError:
            continue


def _magic_code(node: ast.Call) -> str | None:
    """The code run by ``get_ipython().run_line_magic('time', code)`` and its cell form."""
    call = _ipython_call(node)
    if call is None:
        return None
    method, strings = call
    if method not in ("run_line_magic", "run_cell_magic") or strings[0] not in _CODE_MAGICS:
        return None
    func = node.func
    assert isinstance(func, ast.Attribute)
    if func.attr == "run_line_magic" and len(strings) == 2:
        return strings[1]
    if func.attr == "run_cell_magic" and len(strings) == 3:
        return strings[2]
    return None
