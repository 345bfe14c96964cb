"""``python -m modbox_kernel``: launch the kernel, ``install`` its kernelspec, or
``cleanup`` the sandboxes of this user's dead kernels."""

from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "install":
        from .kernelspec import main as install_main

        raise SystemExit(install_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "cleanup":
        from .cleanup import main as cleanup_main

        raise SystemExit(cleanup_main(sys.argv[2:]))
    if _embedded_from_environment():
        # Before the kernel's imports, so the service's start overlaps them (embedded.py).
        from .embedded import start_early

        start_early()
    from .kernelapp import main as kernel_main

    kernel_main()


def _embedded_from_environment() -> bool:
    """Whether the environment alone chooses the embedded service (settings.py reads
    the same variables; a config file that chooses otherwise stops the early one)."""
    backend = os.environ.get("MODBOX_BACKEND", "").strip().lower() or "auto"
    token = os.environ.get("MODBOX_API_TOKEN", "").strip()
    return backend == "local" or (backend == "auto" and not token)


if __name__ == "__main__":
    main()
