"""Entry point of the Modbox agent zip: ``python3 <file>.pyz start --state-dir DIR``.

The kernel never imports this file: ``modbox_kernel.agent.build_agent`` stores it as the
zip's top-level ``__main__.py``. It calls ``main()`` from the script itself, not during
an import (the daemon runs inside that call).

Before that it puts an importer of its own in front of zipimport for this zip. Every
agent start pays zipimport's two costs, about 0.1 s of CPU here, and a class of forty
starting at once pays them forty times over on the same cores:

* zipimport compiles each module from source: bytecode in a zip is used only when it
  sits beside the source, and then its code objects keep whatever file name they were
  compiled under, which the agent's traceback filter (``location.is_agent_file``)
  cannot recognise;
* on 3.10 to 3.13 it compiles each module twice, since ``find_spec`` builds the spec
  through ``get_filename``, which compiles, and ``load_module`` compiles again.

The zip carries bytecode for the Python that built it, under ``__pycache__/`` where
zipimport never looks (``build_agent``). This importer uses it when this Python has the
same magic number, gives its code objects the source's path (as any normal import
does), and otherwise compiles each source once. Before 3.10 zipimport speaks an older
loader protocol; it is left alone there. Stdlib only, and small: this file itself is
compiled at every start.
"""

import sys
import zipimport
from typing import Callable, Optional  # the daemon imports typing anyway


def _install_importer() -> Optional[Callable[[str], zipimport.zipimporter]]:
    """Put the importer in front for this zip's paths; returns the path hook to remove."""
    if not hasattr(zipimport.zipimporter, "find_spec"):
        return None
    import _imp
    import marshal
    from importlib.util import MAGIC_NUMBER

    archive = sys.path[0]
    tag = sys.implementation.cache_tag
    # The header build_agent writes: flags 1 = hash-based, source not checked (the
    # bytecode and its source are one immutable file).
    unchecked = (1).to_bytes(4, "little")

    class AgentImporter(zipimport.zipimporter):
        def _source(self, fullname: str) -> str:
            tail = self.prefix + fullname.rpartition(".")[2]
            return tail + ("/__init__.py" if self.is_package(fullname) else ".py")

        def get_filename(self, fullname: str) -> str:
            return self.archive + "/" + self._source(fullname)

        def get_code(self, fullname: str):  # type: ignore[no-untyped-def]
            source = self._source(fullname)
            folder, _, name = source.rpartition("/")
            try:
                data = self.get_data(f"{folder}/__pycache__/{name[:-3]}.{tag}.pyc")
            except OSError:
                data = b""
            if tag and data[:4] == MAGIC_NUMBER and data[4:8] == unchecked:
                code = marshal.loads(memoryview(data)[16:])
                _imp._fix_co_filename(code, self.archive + "/" + source)  # type: ignore[attr-defined]
                return code
            return super().get_code(fullname)

        def create_module(self, spec):  # type: ignore[no-untyped-def]
            return None  # the default module

        def exec_module(self, module):  # type: ignore[no-untyped-def]
            exec(self.get_code(module.__name__), module.__dict__)

    def hook(path: str) -> zipimport.zipimporter:
        if path == archive or path.startswith(archive + "/"):
            return AgentImporter(path)
        raise ImportError("not the agent's zip")

    sys.path_hooks.insert(0, hook)
    # runpy found this script through a plain zipimporter, cached for the zip's path.
    sys.path_importer_cache.pop(archive, None)
    return hook


_hook = _install_importer() if sys.path and sys.path[0].endswith(".pyz") else None

from modbox_agent.daemon import main  # noqa: E402

# Every agent module is imported now, and a later import of one finds its importer in
# sys.path_importer_cache: the notebook's sys.path_hooks are Python's own again.
if _hook is not None:
    sys.path_hooks.remove(_hook)
sys.exit(main())
