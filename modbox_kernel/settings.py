"""The kernel's settings as environment variables: one table, parsed in one place.

Who calls what, and when: every configurable trait of
:class:`modbox_kernel.kernel.ModboxKernel` takes its default from here
(``EnvSettings.value``), so kernel.json ``env``, the shell, a config file and
``--ModboxKernel.x=…`` all work, in traitlets' usual order. The kernel builds one
:class:`EnvSettings` when it starts. A malformed value never raises while the kernel is
being built (the kernel would die before it could say why): the setting falls back to
its default, and :attr:`EnvSettings.problems` keeps one sentence per bad variable,
naming it, what it got and what it accepts. The kernel then starts no sandbox and
answers every cell with those sentences, until it is restarted with a valid value.

The variables of the embedded local service (``MODBOX_LOCAL_*``,
``MODBOX_REQUIRE_ISOLATION``) are checked here too, because the kernel starts that
service with its own environment: a bad value is reported in the cell instead of as a
service that fails to start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from traitlets import Bool, Dict, Float, HasTraits, Int, Unicode, default

__all__ = ["SETTINGS", "EnvSettings", "KernelSettings", "Setting"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One environment variable: its kind, default and what it accepts."""

    env: str
    kind: str  # text | integer | number | boolean | choice
    default: str | int | float | bool
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # numbers: the smallest accepted value
    unit: str = ""  # numbers: what the value counts ("seconds", "bytes")

    def accepts(self) -> str:
        """What a valid value looks like, for the error sentence."""
        if self.kind == "boolean":
            return "1 or 0 (also true/false, yes/no, on/off)"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("integer", "number"):
            whole = "a whole number" if self.kind == "integer" else "a number"
            low = "" if self.minimum is None else f" of at least {self.minimum:g}"
            unit = f" {self.unit}" if self.unit else ""
            return f"{whole}{unit}{low}, for example {self.default}"
        return "any text"

    def parse(self, raw: str) -> str | int | float | bool:
        """The value of ``raw`` (stripped, non-empty); ValueError when malformed."""
        if self.kind == "text":
            return raw
        text = raw.strip()
        if self.kind == "boolean":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if self.kind == "choice":
            if text.lower() in self.choices:
                return text.lower()
            raise ValueError(text)
        value: int | float = int(text) if self.kind == "integer" else float(text)
        if value != value or value in (float("inf"), float("-inf")):  # nan, inf
            raise ValueError(text)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(text)
        return value


#: Trait name (or, for the service's variables, a name of its own) → setting.
SETTINGS: dict[str, Setting] = {
    "api_url": Setting("MODBOX_API_URL", "text", "https://api.modbox.run"),
    "api_token": Setting("MODBOX_API_TOKEN", "text", ""),
    "backend": Setting("MODBOX_BACKEND", "choice", "auto", choices=("auto", "local", "remote")),
    "image_id": Setting("MODBOX_IMAGE_ID", "text", ""),
    "image": Setting("MODBOX_IMAGE", "text", ""),
    "ttl_seconds": Setting("MODBOX_TTL_SECONDS", "integer", 3600, minimum=1, unit="of seconds"),
    "workspace_id": Setting("MODBOX_WORKSPACE_ID", "text", ""),
    "startup_timeout": Setting(
        "MODBOX_STARTUP_TIMEOUT", "number", 120.0, minimum=0, unit="of seconds"
    ),
    "cell_timeout": Setting("MODBOX_CELL_TIMEOUT", "number", 0.0, minimum=0, unit="of seconds"),
    "output_limit": Setting(
        "MODBOX_OUTPUT_LIMIT", "integer", 10 * 1024 * 1024, minimum=0, unit="of bytes"
    ),
    "copy_workdir": Setting("MODBOX_COPY_WORKDIR", "boolean", True),
    "idle_output": Setting("MODBOX_IDLE_OUTPUT", "boolean", True),
    "copy_limit": Setting(
        "MODBOX_COPY_LIMIT", "integer", 32 * 1024 * 1024, minimum=0, unit="of bytes"
    ),
    "copy_root": Setting("MODBOX_COPY_ROOT", "text", "auto"),
    "sync": Setting("MODBOX_SYNC", "choice", "cell", choices=("cell", "shutdown", "never")),
    "sync_limit": Setting(
        "MODBOX_SYNC_LIMIT", "integer", 256 * 1024 * 1024, minimum=0, unit="of bytes"
    ),
    "sync_file_limit": Setting(
        "MODBOX_SYNC_FILE_LIMIT", "integer", 64 * 1024 * 1024, minimum=0, unit="of bytes"
    ),
    # Read by the embedded local service, which inherits the kernel's environment.
    "local_isolation": Setting(
        "MODBOX_LOCAL_ISOLATION", "choice", "auto", choices=("auto", "bwrap", "none")
    ),
    "local_log_level": Setting(
        "MODBOX_LOCAL_LOG_LEVEL", "choice", "info", choices=("debug", "info", "warning", "error")
    ),
    "require_isolation": Setting("MODBOX_REQUIRE_ISOLATION", "boolean", False),
}


class EnvSettings:
    """The settings read from one environment; bad values become :attr:`problems`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._problems: dict[str, str] = {}
        # Check every variable now, so a bad one is reported even if its trait's
        # default is never asked for (set in a config file, say).
        for name in SETTINGS:
            self.value(name)

    @property
    def problems(self) -> list[str]:
        """One sentence per malformed variable, in table order."""
        return list(self._problems.values())

    def add_problem(self, env: str, sentence: str) -> None:
        """A setting that parsed but cannot be used (checked by its user)."""
        self._problems[env] = sentence

    def value(self, name: str) -> str | int | float | bool:
        """The value of setting ``name``: its variable's, else (unset, empty, bad) the default."""
        setting = SETTINGS[name]
        raw = self._environ.get(setting.env, "")
        if not raw.strip():
            return setting.default
        try:
            return setting.parse(raw)
        except ValueError:
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            self._problems[setting.env] = (
                f"{setting.env}={shown!r} is not a valid value: "
                f"{setting.env} accepts {setting.accepts()}"
            )
            return setting.default

    def text(self, name: str) -> str:
        return str(self.value(name))

    def integer(self, name: str) -> int:
        return int(self.value(name))

    def number(self, name: str) -> float:
        return float(self.value(name))

    def flag(self, name: str) -> bool:
        return bool(self.value(name))


class KernelSettings(HasTraits):
    """The kernel's configurable traits (a mixin of ``ModboxKernel``, configured as
    ``ModboxKernel.<name>``), each defaulting to its variable of :data:`SETTINGS`.

    The class that mixes this in sets ``self._env`` (an :class:`EnvSettings`) before
    traitlets asks for the first default.
    """

    _env: EnvSettings

    api_url = Unicode(help="Modbox API base URL (env MODBOX_API_URL).").tag(config=True)
    api_token = Unicode(
        help="Modbox API token (env MODBOX_API_TOKEN). Unset: use the embedded local service."
    ).tag(config=True)
    backend = Unicode(
        help="auto | local | remote (env MODBOX_BACKEND). auto = remote if a token is set."
    ).tag(config=True)
    image_id = Unicode(help="Sandbox image id (env MODBOX_IMAGE_ID).").tag(config=True)
    image = Unicode(help="Raw sandbox image reference (env MODBOX_IMAGE).").tag(config=True)
    ttl_seconds = Int(help="Sandbox TTL in seconds, 60-86400 (env MODBOX_TTL_SECONDS).").tag(
        config=True
    )
    workspace_id = Unicode(help="Modbox workspace id (env MODBOX_WORKSPACE_ID).").tag(config=True)
    sandbox_env = Dict(
        value_trait=Unicode(), help="Extra environment variables for the sandbox."
    ).tag(config=True)
    startup_timeout = Float(
        help="Seconds to wait for a sandbox to be ready (env MODBOX_STARTUP_TIMEOUT)."
    ).tag(config=True)
    cell_timeout = Float(
        help="Time limit per cell in seconds, 0 = none (env MODBOX_CELL_TIMEOUT). A cell can "
        "set its own with a first line '%%modbox_timeout SECONDS'. At the limit the cell is "
        "interrupted, and if it does not stop, its Python process is restarted."
    ).tag(config=True)
    output_limit = Int(
        help="Maximum stream output per cell in bytes, 0 = unlimited (env MODBOX_OUTPUT_LIMIT). "
        "Beyond it output is dropped with one notice."
    ).tag(config=True)
    copy_workdir = Bool(
        help="Copy the kernel's working directory (the notebook's folder) into each new "
        "sandbox, so relative paths such as 'data.csv' work as with a local kernel; hidden "
        "files are left out (env MODBOX_COPY_WORKDIR, 1 or 0)."
    ).tag(config=True)
    idle_output = Bool(
        help="Deliver what the sandbox prints or displays while no cell runs (threads, "
        "timers, widgets changed from a thread), as a local kernel does; costs one waiting "
        "request per idle kernel every 50 s (env MODBOX_IDLE_OUTPUT, 1 or 0)."
    ).tag(config=True)
    copy_limit = Int(
        help="Copy the notebook's folder only if its files total at most this many bytes "
        "(env MODBOX_COPY_LIMIT)."
    ).tag(config=True)

    copy_root = Unicode(
        help="Which host folder is copied: 'auto' (the repository root holding .git above "
        "the notebook, when it fits MODBOX_COPY_LIMIT, else the notebook's folder), "
        "'folder' (the notebook's folder), or an absolute path of a folder that contains "
        "the notebook's; '../data' then resolves as on the host (env MODBOX_COPY_ROOT)."
    ).tag(config=True)
    sync = Unicode(
        help="When files written in the sandbox's working folder come back to the host "
        "folder: 'cell' (after each cell), 'shutdown' or 'never' (env MODBOX_SYNC)."
    ).tag(config=True)
    sync_limit = Int(
        help="Bytes of files copied back after one cell, 0 = unlimited (env MODBOX_SYNC_LIMIT)."
    ).tag(config=True)
    sync_file_limit = Int(
        help="Largest file copied back automatically, in bytes, 0 = unlimited "
        "(env MODBOX_SYNC_FILE_LIMIT); '%modbox pull' copies larger ones."
    ).tag(config=True)

    @default("copy_root")
    def _default_copy_root(self) -> str:
        return self._env.text("copy_root")

    @default("sync")
    def _default_sync(self) -> str:
        return self._env.text("sync")

    @default("sync_limit")
    def _default_sync_limit(self) -> int:
        return self._env.integer("sync_limit")

    @default("sync_file_limit")
    def _default_sync_file_limit(self) -> int:
        return self._env.integer("sync_file_limit")

    @default("api_url")
    def _default_api_url(self) -> str:
        return self._env.text("api_url")

    @default("api_token")
    def _default_api_token(self) -> str:
        return self._env.text("api_token")

    @default("backend")
    def _default_backend(self) -> str:
        return self._env.text("backend")

    @default("image_id")
    def _default_image_id(self) -> str:
        return self._env.text("image_id")

    @default("image")
    def _default_image(self) -> str:
        return self._env.text("image")

    @default("ttl_seconds")
    def _default_ttl(self) -> int:
        return self._env.integer("ttl_seconds")

    @default("workspace_id")
    def _default_workspace(self) -> str:
        return self._env.text("workspace_id")

    @default("cell_timeout")
    def _default_cell_timeout(self) -> float:
        return self._env.number("cell_timeout")

    @default("output_limit")
    def _default_output_limit(self) -> int:
        return self._env.integer("output_limit")

    @default("copy_workdir")
    def _default_copy_workdir(self) -> bool:
        return self._env.flag("copy_workdir")

    @default("idle_output")
    def _default_idle_output(self) -> bool:
        return self._env.flag("idle_output")

    @default("copy_limit")
    def _default_copy_limit(self) -> int:
        return self._env.integer("copy_limit")

    @default("startup_timeout")
    def _default_startup_timeout(self) -> float:
        return self._env.number("startup_timeout")
