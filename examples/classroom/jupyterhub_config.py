"""JupyterHub for a class on one host: every student's notebook code runs in a sandbox.

The hub, the students' single-user servers and one shared Modbox-compatible service
(``python -m modbox_kernel.local``, see ``modbox-local.service`` beside this file) run
on the same host. Each student's default kernel is Modbox Python; each student's
server gets its own owner credential, derived here from the service's secret and the
user name, so a student sees and holds only their own sandboxes (a student who reads
their kernel's environment learns nothing that reaches anyone else's).
``docs/classroom.md`` explains the sizing and the settings.

Settings come from the hub's environment, so the same file serves the test and a
course (``tests/test_hub.py`` runs it):

* ``MODBOX_CLASS_SECRET``: the shared service's ``--token`` (keep it from students:
  the spawner below passes students only their own credential).
* ``MODBOX_CLASS_SERVICE_URL``: where the shared service listens.
* ``MODBOX_CLASS_HOMES``: the folder that holds the students' homes.
"""

import os

from modbox_kernel.local.owners import owner_token

c = get_config()  # noqa: F821 - JupyterHub provides it

# Read once, then dropped from the hub's environment: the processes the hub starts
# (the proxy, the students' servers) must not inherit it.
SECRET = os.environ.pop("MODBOX_CLASS_SECRET")
SERVICE_URL = os.environ.get("MODBOX_CLASS_SERVICE_URL", "http://127.0.0.1:8765")
HOMES = os.environ.get("MODBOX_CLASS_HOMES", "/srv/class/home")

# Who logs in and how servers start: replace these two for a real course (an OAuth or
# LDAP authenticator; SystemdSpawner or DockerSpawner for one Unix user per student).
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = HOMES + "/{username}"

# Every student's server: JupyterLab, Modbox Python as the default kernel.
c.Spawner.default_url = "/lab"
c.Spawner.args = ["--MultiKernelManager.default_kernel_name=modbox-python"]


def _credential(spawner):  # type: ignore[no-untyped-def]
    """This student's own credential for the shared service (never the secret)."""
    return owner_token(SECRET, spawner.user.name)


c.Spawner.environment = {
    "MODBOX_API_URL": SERVICE_URL,
    "MODBOX_API_TOKEN": _credential,
    "MODBOX_BACKEND": "remote",
}
