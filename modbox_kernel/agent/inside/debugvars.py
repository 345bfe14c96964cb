"""The debugger's views of variables: which names they hide, and the namespace's globals.

``debugging.Debugger`` filters debugpy's ``variables`` answers with :func:`accept_variable`
and answers ``inspectVariables`` (the globals while no cell is stopped) with
:func:`namespace_variables`, formatted by pydevd as the stock kernel's are.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Dict, List

from .naming import cell_file_name

#: Names the variable views leave out, as the stock kernel does.
_HIDDEN_NAMES = frozenset(
    "__name__ __doc__ __package__ __loader__ __spec__ __annotations__ __builtins__ "
    "__builtin__ __display__ get_ipython debugpy exit quit In Out _oh _dh _ __ ___".split()
)


def accept_variable(name: str) -> bool:
    return not (name in _HIDDEN_NAMES or re.match(r"^_\d", name) is not None or name[:2] == "_i")


def namespace_variables() -> List[Dict[str, Any]]:
    """The notebook's globals as DAP variables, formatted by pydevd as the
    stock kernel's ``inspectVariables`` does, so nested values can be expanded."""
    # Puts pydevd's bundle on sys.path, so it must come first.
    importlib.import_module("debugpy.server.api")
    from _pydevd_bundle import pydevd_frame_utils
    from _pydevd_bundle.pydevd_api import PyDevdAPI
    from _pydevd_bundle.pydevd_suspended_frames import (
        SuspendedFramesManager,
        _FramesTracker,
    )
    from IPython import get_ipython

    class _Code:
        co_filename = cell_file_name("sys._getframe()")
        co_name = "<module>"

    class _Frame:
        def __init__(self, namespace: Dict[str, Any]) -> None:
            self.f_code = _Code()
            self.f_globals = self.f_locals = namespace
            self.f_back = None

    class _PyDB:
        variable_presentation = PyDevdAPI.VariablePresentation()

    manager = SuspendedFramesManager()
    tracker = _FramesTracker(manager, _PyDB())
    frame = _Frame(get_ipython().user_ns)
    tracker.track("thread1", pydevd_frame_utils.create_frames_list_from_frame(frame))
    try:
        children = manager.get_variable(id(frame)).get_children_variables()
        return [v for v in (c.get_var_data() for c in children) if accept_variable(v["name"])]
    finally:
        tracker.untrack_all()
