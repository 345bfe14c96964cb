"""Where the agent's own code lives, and what follows from it.

The agent runs from one zip file (``modbox-agent-<version>.pyz``, built by
``modbox_kernel.agent``) or, in development, from this package's folder. Three things
depend on that place: the version the agent reports (the hash of its sources that the
zip carries, equal to the kernel's ``AGENT_VERSION``), which traceback frames are the
agent's own (hidden from the user: ``tracebacks``), and the ``sys.path`` entry that
must not stay visible to the notebook (``daemon``).
"""

from __future__ import annotations

import os
import zipimport

#: This package's folder (inside the zip: ``<file>.pyz/modbox_agent``).
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_parent = os.path.dirname(PACKAGE_DIR)
#: The zip file the agent runs from, or None when it runs from a source folder.
ARCHIVE = _parent if os.path.isfile(_parent) else None
#: Every file of the agent's own code is below this path.
ROOT = ARCHIVE or PACKAGE_DIR


def is_agent_file(filename: str) -> bool:
    """Whether a code object's file name is one of the agent's modules."""
    path = os.path.abspath(filename)
    return path == ROOT or path.startswith(ROOT + os.sep)


def agent_version() -> str:
    """The hash of the agent's sources that the zip carries (its ``VERSION`` member,
    written by ``modbox_kernel.agent.build_agent``): equals the kernel's
    ``AGENT_VERSION`` when both come from the same sources."""
    if ARCHIVE is None:
        return "source"
    member = os.path.basename(PACKAGE_DIR) + "/VERSION"
    try:
        return zipimport.zipimporter(ARCHIVE).get_data(member).decode("ascii").strip()
    except (OSError, ImportError, UnicodeDecodeError):
        return "unknown"
