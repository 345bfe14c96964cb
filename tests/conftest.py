"""Shared fixtures. The helpers they are built on live in tests/service_helpers.py (the
local Modbox service, sandboxes, host inspection) and tests/kernel_helpers.py (kernels);
tests import those by name, never from this file.

``local_service`` is the real embedded Modbox service, started once per test session
(:func:`service_helpers.running_local_service`): ``python -m modbox_kernel.local --port 0
--exit-with-parent`` as a subprocess, whose one-line JSON startup announcement gives a
:class:`~service_helpers.LocalService` (``base_url``, ``token``, ``process``,
``isolation``). API-client, kernel and service tests all talk to it over a real socket.
It is stopped (SIGTERM, which destroys every sandbox) at the end of the session;
``--exit-with-parent`` covers a pytest that dies without cleaning up.

``require_isolation`` is for tests that only mean something under bubblewrap: with
``MODBOX_REQUIRE_ISOLATION=1`` (CI) a service without bwrap is a failure, elsewhere
the test is skipped with the reason. (Under that variable the service itself refuses
to start without a working bwrap, so the failure shows up even earlier.)

``local_sandbox`` is one running sandbox shared by the service tests that do not
need a fresh one (creating a sandbox is cheap, but not free); ``fresh_sandbox`` is one
of its own per test. ``canary`` is a module-wide random secret for the tests that plant
one in a service's environment and look for it from inside a sandbox.

``kernels`` is a module-wide :class:`~kernel_helpers.Kernels` factory: a kernel test
module's kernel fixture is ``kernels.start(env, kernel_name=..., warm=...)`` (the options
of :func:`kernel_helpers.running_kernel`), and every kernel it started is stopped when
the module ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kernel_helpers import Kernels
from service_helpers import (
    LocalSandbox,
    LocalService,
    require_bwrap,
    running_local_service,
    running_sandbox,
)


@pytest.fixture(scope="session")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    with running_local_service(tmp_path_factory.mktemp("local-service") / "service.log") as service:
        yield service


@pytest.fixture
def require_isolation(local_service: LocalService) -> None:
    require_bwrap(
        local_service,
        "bubblewrap is unusable on this machine; set MODBOX_REQUIRE_ISOLATION=1 "
        "to make this a failure",
    )


@pytest.fixture(scope="module")
def canary() -> str:
    return f"canary-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def local_sandbox(local_service: LocalService) -> Iterator[LocalSandbox]:
    with running_sandbox(local_service, task_id=f"shared-{os.getpid()}") as sandbox:
        yield sandbox


@pytest.fixture
def fresh_sandbox(local_service: LocalService) -> Iterator[LocalSandbox]:
    with running_sandbox(local_service) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def kernels() -> Iterator[Kernels]:
    """Starts warmed-up kernels for one module; stops all of them when the module ends.

    A fixture that uses it requests the service its kernel talks to *before*
    ``kernels`` (``def kc(tight_service, kernels)``): fixtures are torn down in reverse,
    so the kernels then stop while their service still runs.
    """
    with Kernels() as started:
        yield started


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so a fixture can tell that its test failed
    (the browser tests save a screenshot and the console then)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
