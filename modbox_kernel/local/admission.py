"""Admission control: a cap on live sandboxes and on the memory they may claim together.

Who calls it: ``registry.Registry.create``, synchronously, before it registers a new
sandbox. Beyond either cap the answer is a 429 ``rate_limited`` envelope with a
``Retry-After`` header and a sentence the kernel can show as is ("the host is at
capacity: N sandboxes running; try again shortly").

Why a memory budget as well as a count: each sandbox may use up to its memory limit, so
``live * limit`` is what the host may be asked for at worst (``docs/isolation.md``,
"Admission and capacity"). The default budget (``__main__``) is twice the host's RAM:
limits are ceilings that most notebooks never reach, and sandbox processes carry
``oom_score_adj`` 1000, so if the host itself runs short the kernel kills inside a
sandbox first, never the service or Jupyter.
"""

from __future__ import annotations

from .config import Limits
from .envelope import ServiceError
from .units import human_bytes

RETRY_AFTER_S = 5


def admit(live: int, limits: Limits) -> None:
    """Raise the 429 envelope when one more sandbox would pass a cap."""
    if live >= limits.max_sandboxes:
        cap = limits.max_sandboxes
        raise at_capacity(live, f"at most {cap} {_noun(cap)} may run at once")
    if (live + 1) * limits.memory > limits.max_total_memory:
        raise at_capacity(
            live,
            f"each sandbox may use {human_bytes(limits.memory)} of memory and this host "
            f"admits {human_bytes(limits.max_total_memory)} in total",
        )


def _noun(count: int) -> str:
    return "sandbox" if count == 1 else "sandboxes"


def at_capacity(live: int, why: str) -> ServiceError:
    return ServiceError(
        429,
        "rate_limited",
        f"The host is at capacity: {live} {_noun(live)} running; try again shortly.",
        hint=f"{why[0].upper()}{why[1:]}. Destroy sandboxes you no longer need.",
        retryable=True,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
