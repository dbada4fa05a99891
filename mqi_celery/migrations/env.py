"""Alembic environment: runs on the connection handed over by ``mqi_celery.db.migrate``."""
from alembic import context
from sqlalchemy import create_engine

from mqi_celery.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic -x url=... upgrade head` from a shell
    url = context.get_x_argument(as_dictionary=True)["url"]
    connection = create_engine(url).connect()

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
