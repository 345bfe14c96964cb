"""How cells run: the interface of ``ipython_runner`` and ``fallback``. Main thread only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    from .cells import Cell


class StdinNotImplementedError(RuntimeError):
    """Fallback twin of IPython's class: raised by ``input()`` when stdin is not allowed."""


class Runner:
    """Runs cells and answers the namespace's questions; ``core.Agent`` owns one."""

    mode = "none"
    stdin_error: type = StdinNotImplementedError

    def run(self, cell: Cell) -> Dict[str, Any]:
        """Run the cell; return the ``done`` fields (status, user_expressions, payload…)."""
        raise NotImplementedError

    async def run_async(self, cell: Cell) -> Dict[str, Any]:
        """Run the cell on the agent's event loop (which is running meanwhile, as the
        stock kernel's is); by default synchronously, as :meth:`run`."""
        return self.run(cell)

    def after_cell(self) -> None:
        """Called on the main thread after each cell's ``done`` event is out."""

    def complete(self, code: str, cursor_pos: int, *, quick: bool = False) -> Dict[str, Any]:
        """Completions at ``cursor_pos``; ``quick``: only what needs no slow warm-up."""
        raise NotImplementedError

    def inspect(self, code: str, cursor_pos: int, detail_level: int) -> Dict[str, Any]:
        raise NotImplementedError

    def is_complete(self, code: str) -> Dict[str, Any]:
        raise NotImplementedError

    def history(self, req: Dict[str, Any]) -> List[Any]:
        raise NotImplementedError
