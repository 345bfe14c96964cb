"""Plain-Python cells when IPython is missing in the sandbox, with the same event shapes.

``core.Agent.setup_runner`` builds a :class:`FallbackRunner` when IPython cannot be
imported (or ``MODBOX_AGENT_NO_IPYTHON=1``); the main thread then calls its methods.
"""

from __future__ import annotations

import base64
import builtins
import io
import re
import sys
import types
from typing import TYPE_CHECKING, Any, Dict, List

from .runner import Runner, StdinNotImplementedError
from .tracebacks import format_exception
from .wire import encode_mimebundle

if TYPE_CHECKING:
    from .cells import Cell
    from .core import Agent


class FallbackRunner(Runner):
    """Plain-Python cells when IPython is missing: exec all, display the last expression."""

    mode = "fallback"
    stdin_error = StdinNotImplementedError
    session = 1

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        module.__dict__["display"] = self._display
        sys.modules["__main__"] = module
        self.ns = module.__dict__
        self.records: List[List[Any]] = []  # [session, line, source]
        self.loop: Any = None

    # -- running
    def run(self, cell: Cell) -> Dict[str, Any]:
        """Run the cell on a loop of its own (the agent calls :meth:`run_async`)."""
        import asyncio

        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        result: Dict[str, Any] = self.loop.run_until_complete(self.run_async(cell))
        return result

    async def run_async(self, cell: Cell) -> Dict[str, Any]:
        import linecache

        n = cell.execution_count
        filename = f"Cell In[{n}]"
        # Register the source so tracebacks show the offending lines.
        linecache.cache[filename] = (len(cell.code), None, cell.code.splitlines(True), filename)
        if cell.store_history and not cell.silent:
            self.records.append([self.session, n, cell.code])
        try:
            await self._exec(cell, filename)
            self._flush_figures()
        except BaseException as exc:
            err = format_exception(exc)
            self.agent.emit({"type": "error", **err})
            return {"status": "error", "user_expressions": {}, "payload": [], **err}
        return {
            "status": "ok",
            "user_expressions": self._user_expressions(cell.user_expressions),
            "payload": [],
        }

    async def _exec(self, cell: Cell, filename: str) -> None:
        import ast

        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        tree = ast.parse(cell.code, filename, "exec")
        last: Any = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not cell.silent:
            last = tree.body.pop().value  # type: ignore[attr-defined]
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
        await self._eval(body)
        if last is not None:
            expr = compile(ast.Expression(last), filename, "eval", flags=flags, dont_inherit=True)
            value = await self._eval(expr)
            if value is not None:
                self.ns["_"] = value
                self.agent.emit(
                    {
                        "type": "execute_result",
                        "execution_count": cell.execution_count,
                        **self._format(value),
                    }
                )

    async def _eval(self, code: types.CodeType) -> Any:
        result = eval(code, self.ns)
        if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
            import asyncio

            task = asyncio.ensure_future(result)  # on the agent's running loop
            with self.agent.sigint_cancels(task):  # an interrupt cancels, never raises
                try:
                    result = await task
                except asyncio.CancelledError:
                    raise KeyboardInterrupt from None
        return result

    _REPR_METHODS = (
        ("_repr_html_", "text/html"),
        ("_repr_markdown_", "text/markdown"),
        ("_repr_svg_", "image/svg+xml"),
        ("_repr_png_", "image/png"),
        ("_repr_jpeg_", "image/jpeg"),
        ("_repr_latex_", "text/latex"),
        ("_repr_json_", "application/json"),
        ("_repr_javascript_", "application/javascript"),
    )

    def _format(self, obj: Any) -> Dict[str, Any]:
        """A mimebundle like IPython's formatters would give, from repr and _repr_*_."""
        data: Dict[str, Any] = {"text/plain": repr(obj)}
        metadata: Dict[str, Any] = {}
        if not isinstance(obj, type):
            for method_name, mime in self._REPR_METHODS:
                method = getattr(obj, method_name, None)
                if not callable(method):
                    continue
                try:
                    value = method()
                except Exception:
                    continue
                if isinstance(value, tuple) and len(value) == 2:
                    value, md = value
                    metadata[mime] = md
                if value is not None:
                    data[mime] = value
            bundle = getattr(obj, "_repr_mimebundle_", None)
            if callable(bundle):
                try:
                    extra = bundle()
                    if isinstance(extra, tuple):
                        extra, md = extra
                        metadata.update(md or {})
                    data.update(extra or {})
                except Exception:
                    pass
        return {"data": encode_mimebundle(data), "metadata": metadata}

    def _display(self, *objs: Any, **kwargs: Any) -> None:
        for obj in objs:
            self.agent.emit({"type": "display_data", "transient": {}, **self._format(obj)})

    def _flush_figures(self) -> None:
        """Open matplotlib figures become PNG display_data at cell end, like inline."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            self.agent.emit(
                {
                    "type": "display_data",
                    "data": {
                        "text/plain": repr(fig),
                        "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                    },
                    "metadata": {},
                    "transient": {},
                }
            )
        plt.close("all")

    def _user_expressions(self, expressions: Dict[str, str]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, expr in expressions.items():
            try:
                value = eval(expr, self.ns)
                out[key] = {"status": "ok", **self._format(value)}
            except Exception as exc:
                out[key] = {"status": "error", **format_exception(exc)}
        return out

    # -- introspection
    @staticmethod
    def _token(code: str, cursor_pos: int) -> str:
        before = re.search(r"[\w.]*$", code[:cursor_pos])
        after = re.match(r"\w*", code[cursor_pos:])
        return (before.group(0) if before else "") + (after.group(0) if after else "")

    def complete(self, code: str, cursor_pos: int, *, quick: bool = False) -> Dict[str, Any]:
        match = re.search(r"[\w.]*$", code[:cursor_pos])
        text = match.group(0) if match else ""
        import rlcompleter

        completer = rlcompleter.Completer(self.ns)
        matches: List[str] = []
        for state in range(1000):
            item = completer.complete(text, state)
            if item is None:
                break
            item = item.rstrip("(")  # rlcompleter marks callables; Jupyter does not
            if item not in matches:
                matches.append(item)
        return {
            "matches": matches,
            "cursor_start": cursor_pos - len(text),
            "cursor_end": cursor_pos,
            "metadata": {},
        }

    def inspect(self, code: str, cursor_pos: int, detail_level: int) -> Dict[str, Any]:
        name = self._token(code, cursor_pos).strip(".")
        reply: Dict[str, Any] = {"found": False, "data": {}, "metadata": {}}
        if not name:
            return reply
        head, *rest = name.split(".")
        if head in self.ns:
            obj = self.ns[head]
        elif hasattr(builtins, head):
            obj = getattr(builtins, head)
        else:
            return reply
        try:
            for part in rest:
                obj = getattr(obj, part)
        except Exception:
            return reply
        import pydoc

        text = pydoc.render_doc(obj, title=name + ": %s", renderer=pydoc.plaintext)  # type: ignore[attr-defined]
        reply["data"] = {"text/plain": text}
        reply["found"] = True
        return reply

    def is_complete(self, code: str) -> Dict[str, Any]:
        import codeop

        try:
            compiled = codeop.compile_command(code, "<cell>", "exec")
        except (SyntaxError, OverflowError, ValueError):
            return {"status": "invalid"}
        if compiled is None:
            last = code.rstrip("\n").split("\n")[-1]
            indent = len(last) - len(last.lstrip(" "))
            if last.rstrip().endswith(":"):
                indent += 4
            return {"status": "incomplete", "indent": " " * indent}
        return {"status": "complete"}

    def history(self, req: Dict[str, Any]) -> List[Any]:
        kind = req.get("hist_access_type")
        output = bool(req.get("output", False))
        records = self.records
        if kind == "tail":
            n = int(req.get("n") or 10)
            records = records[-n:] if n > 0 else []
        elif kind == "range":
            session = int(req.get("session") or 0)
            if session <= 0:
                session += self.session
            start = int(req.get("start") or 0)
            stop = req.get("stop")
            records = [
                r
                for r in records
                if r[0] == session and r[1] >= start and (stop is None or r[1] < int(stop))
            ]
        elif kind == "search":
            import fnmatch

            pattern = str(req.get("pattern") or "*")
            records = [r for r in records if fnmatch.fnmatchcase(r[2], pattern)]
            if req.get("unique"):
                latest: Dict[str, List[Any]] = {}
                for r in records:
                    latest.pop(r[2], None)
                    latest[r[2]] = r
                records = list(latest.values())
            limit = req.get("n")
            if limit is not None:
                records = records[-int(limit) :] if int(limit) > 0 else []
        else:
            records = []
        if output:
            return [[r[0], r[1], [r[2], None]] for r in records]
        return [list(r) for r in records]
