"""Alembic environment: the URL comes from the caller (``fhir-consent migrate``), never a file.

``target_metadata`` lists every package's own ``MetaData``: the FHIR store's and the SMART
authorization server's (:mod:`smart_on_fhir.tables`), so autogenerate sees all tables.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from fhir_consent.store.db import normalize_url
from fhir_consent.store.tables import metadata
from smart_on_fhir.tables import metadata as smart_metadata

config = context.config
target_metadata = [metadata, smart_metadata]


def run_migrations_offline() -> None:
    context.configure(
        url=normalize_url(config.get_main_option("sqlalchemy.url") or ""),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(
        normalize_url(config.get_main_option("sqlalchemy.url") or ""), poolclass=pool.NullPool
    )
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
