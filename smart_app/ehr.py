"""Reading the EHR with the clinician's token, through the project's one FHIR client.

:class:`EhrReader` is the small surface the dashboard needs (paged search, read); the FHIR client
owns the HTTP (timeouts, retries, paging, refusing cross-host ``next`` links, size caps). The token
comes from the launch and is refreshed once when the EHR answers 401 (checklist F9).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol


class EhrReadError(Exception):
    """A search or read failed; ``status`` is the EHR's HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, unauthorized: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.unauthorized = unauthorized


class EhrReader(Protocol):
    def search(self, resource_type: str, params: Mapping[str, str]) -> Iterator[Mapping[str, Any]]:
        """Yield each Bundle page of a search, following ``next`` links on the same server only."""
        ...

    def read(self, resource_type: str, resource_id: str) -> Mapping[str, Any]: ...
