"""Users' adapters in step plans: what lets `edge@ana:10` run ana's adapter for ten steps.

HybridPipeline knows plan segments name adapters but not what an adapter is (the
core and the time axis import no users axis). It is handed an `AdapterSet`, which
resolves a name to one version of one user's adapter (its content hash goes into
the trajectory's provenance) and puts it on the segment's U-Net for those steps only:
afterwards the U-Net computes exactly what it computed before.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .adapters import AdapterRef, adapter_applied, resolve_adapter


class AdapterSet:
    """Adapters by user name (or folder), resolved once per name; `applied` wraps a segment's steps."""

    def __init__(self, root: Path | None = None, bound: dict[str, str] | None = None):
        self.root = root
        self.bound = dict(bound or {})  # name -> adapter folder, for adapters outside the users folder
        self._refs: dict[str, AdapterRef] = {}

    def resolve(self, name: str) -> AdapterRef:
        """The adapter a plan's `@name` means; AdapterError (one line) when there is none."""
        if name not in self._refs:
            self._refs[name] = resolve_adapter(self.bound.get(name, name), self.root)
        return self._refs[name]

    @contextmanager
    def applied(self, unet, name: str) -> Iterator[AdapterRef]:
        ref = self.resolve(name)
        with adapter_applied(unet, ref):
            yield ref
