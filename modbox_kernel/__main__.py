"""``python -m modbox_kernel``: launch the kernel, ``install`` its kernelspec, or
``cleanup`` the sandboxes of this user's dead kernels."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "install":
        from .kernelspec import main as install_main

        raise SystemExit(install_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "cleanup":
        from .cleanup import main as cleanup_main

        raise SystemExit(cleanup_main(sys.argv[2:]))
    from .kernelapp import main as kernel_main

    kernel_main()


if __name__ == "__main__":
    main()
