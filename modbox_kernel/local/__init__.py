"""The embedded Modbox-compatible service: ``python -m modbox_kernel.local``.

It serves the Modbox control plane (canonical and legacy sandbox routes, images,
health) and each sandbox's runtime API (exec, files) on 127.0.0.1, running every
sandbox as a long-lived bubblewrap jail — or, where bwrap is unusable, as plain child
processes, loudly. The kernel starts it as a subprocess when no Modbox token is
configured; nothing here imports ``api``, ``session`` or ``kernel``.

Modules, in call order: ``__main__`` (CLI, startup line; ``check`` for ``--check``)
→ ``isolation`` (probe, choose the jail) and ``cgroups`` (limits) → ``app``
(Starlette, envelope, request ids, Host check) → ``routes_control`` /
``routes_runtime`` (``owners`` says who calls) → ``registry`` (lifecycle, TTL,
leases, limit events; ``jailcalls`` relays exec and agent requests; ``records``
holds a sandbox's record; ``admission`` caps creates and ``waitline`` orders those
waiting at capacity; ``usage`` books what each owner used; ``pool`` keeps sandboxes
ready with the kernel's agent started) →
``jailprocess`` (one jail, framed channel) → ``supervisor`` (inside the jail; it also
relays the ``agent`` route's requests to an agent without a socket, which
``agentsocket`` otherwise reaches directly). ``jail`` builds the argv with ``launcher``
(cgroups, privilege drop) and ``seccomp`` (the filter), ``files`` does symlink-proof
workspace I/O, ``procscan`` finds stray processes, ``orphans`` reaps what bwrap leaves
behind, ``shapes`` holds the SDK's JSON shapes.
"""
