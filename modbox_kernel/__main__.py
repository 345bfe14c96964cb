"""``python -m modbox_kernel``: launch the kernel, or ``install`` its kernelspec."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "install":
        from .kernelspec import main as install_main

        raise SystemExit(install_main(sys.argv[2:]))
    from .kernelapp import main as kernel_main

    kernel_main()


if __name__ == "__main__":
    main()
