"""database.url read one way (``db_url``): by the Store, the command line's fast reads,
``mqi config check`` and ``mqi db backup``."""
from __future__ import annotations

from pathlib import Path

from mqi_celery.db_url import DatabaseURL


def test_sqlite_urls_name_their_file():
    assert DatabaseURL("sqlite:///var/mqi.db").kind == "sqlite"
    assert DatabaseURL("sqlite:///var/mqi.db").sqlite_path == Path("var/mqi.db")
    assert DatabaseURL("sqlite:////abs/mqi.db?timeout=5").sqlite_path == Path("/abs/mqi.db")
    assert DatabaseURL("sqlite+pysqlite:///x.db").sqlite_path == Path("x.db")
    assert DatabaseURL("sqlite:///:memory:").sqlite_path is None
    assert DatabaseURL("sqlite://").sqlite_path is None
    assert DatabaseURL("postgresql://db/mqi").sqlite_path is None


def test_postgresql_goes_through_psycopg2_with_a_connect_and_a_lock_timeout_unless_set():
    plain = DatabaseURL("postgresql://mqi:pw@db.hospital:5432/mqi")
    assert plain.kind == "postgresql"
    assert plain.for_sqlalchemy() == "postgresql+psycopg2://mqi:pw@db.hospital:5432/mqi"
    assert plain.connect_args() == {"connect_timeout": 10, "options": "-c lock_timeout=30000"}
    assert DatabaseURL("postgresql+psycopg2://db/mqi?connect_timeout=3&options=-c%20x%3D1").connect_args() == {}
    assert DatabaseURL("postgresql+asyncpg://db/mqi").connect_args() == {}
    assert DatabaseURL("sqlite:///x.db").connect_args() == {}
    assert DatabaseURL("mysql://db/mqi").kind == "mysql"


def test_the_libpq_address_leaves_the_password_out_when_asked():
    url = DatabaseURL("postgresql+psycopg2://mqi:p%40ss%3Aword@db.hospital:5432/mqi?sslmode=require")
    assert url.libpq() == "postgresql://mqi:p%40ss%3Aword@db.hospital:5432/mqi?sslmode=require"
    assert url.libpq(password=False) == "postgresql://mqi@db.hospital:5432/mqi?sslmode=require"
    assert url.password == "p@ss:word"  # for PGPASSWORD: decoded
    assert "word" not in url.where and url.where == "db.hospital:5432/mqi?sslmode=require"
    assert DatabaseURL("postgresql://db/mqi").libpq(password=False) == "postgresql://db/mqi"
    assert DatabaseURL("postgresql://db/mqi").password is None
