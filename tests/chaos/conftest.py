"""The chaos scenarios' database: a fresh migrated one on the machine's PostgreSQL
(TimescaleDB), dropped afterwards. The scenarios that stop the database use an embedded
server of their own instead."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..databases import SYSTEM_PG, create_database, drop_database


@pytest.fixture
async def system_db() -> AsyncIterator[str]:
    dsn = await create_database(SYSTEM_PG)
    yield dsn
    await drop_database(SYSTEM_PG, dsn)
