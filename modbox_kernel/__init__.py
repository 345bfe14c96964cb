"""Modbox Python: a Jupyter kernel that runs every cell inside an isolated Modbox sandbox.

Layers (each imports only the ones to its left):
``errors`` ← ``api`` ← ``session`` ← ``kernel`` ← ``kernelapp`` / ``kernelspec`` / ``__main__``.
``local`` (the embedded Modbox-compatible service) and ``agent`` (the in-sandbox
process) import nothing from the rest of the package.
"""

__version__ = "0.1.0"
