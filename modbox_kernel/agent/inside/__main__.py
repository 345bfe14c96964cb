"""``python3 -m <this package> start --state-dir DIR`` (from a source folder).

The built zip has its own top-level ``__main__.py`` that does the same; see
``modbox_kernel.agent.build_agent``.
"""

import sys

from .daemon import main

sys.exit(main())
