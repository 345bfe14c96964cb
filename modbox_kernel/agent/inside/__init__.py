"""The Modbox in-sandbox agent: one long-lived process that holds the user's namespace.

This package runs inside the sandbox. The kernel side (``modbox_kernel.agent``) zips it
into one file, uploads that file and starts it with one exec:
``python3 -u modbox-agent-<version>.pyz start --state-dir <dir>``. Everything here is
stdlib-only, imports nothing else of ``modbox_kernel`` (relative imports only) and runs
on any CPython >= 3.8: it is executed by whatever ``python3`` the sandbox has.

Who calls what, and when:

* ``daemon.cmd_start`` (the ``start`` command) daemonizes (double fork, ``setsid``),
  writes ``<dir>/port`` and ``<dir>/token`` and prints one JSON line; the daemon's body
  is ``daemon.run_daemon``.
* Every later exec is a short bash line (``docs/agent-protocol.md``) that connects to
  ``127.0.0.1:<port>``, sends ``<token> <base64 JSON>`` and prints the one-line JSON
  answer. ``server`` accepts those connections on threads; ``ops`` answers them.
* Cells run one at a time on the MAIN thread (so ``SIGINT`` becomes
  ``KeyboardInterrupt`` in user code), in ``core.Agent.main_loop``, through the IPython
  runner (``ipython_runner``) when IPython is importable, otherwise through the plain
  fallback (``fallback``) with the same event shapes.
* fds 1 and 2 are pipes drained by a reader thread (``capture``) into ``stream`` events
  of the running cell, so prints, ``!cmd``, ``os.system`` and C extensions share one
  ordered stream per fd. Each cell's numbered events and the cursor the kernel reads
  them with live in ``cells``.

Modules, in dependency order: ``protocol`` (the request and event names, shared with
the kernel), ``wire`` (JSON helpers), ``location`` (where this code lives: version,
frames to hide), ``naming`` (ipykernel's cell file names), ``tracebacks``, ``state``
(the state-dir files), ``warmup`` (jedi warm-up gate), ``cells``, ``runner``,
``fallback``, ``ipython_runner``, ``capture``, ``comms``, ``stdin``, ``core``, ``ops``,
``server``, ``daemon``.
"""
