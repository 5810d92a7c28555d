#!/bin/sh
# Container entrypoint: apply DB migrations, then run the given command
# (the API by default, or `python -m worker`). Migrations run here and only
# here; nothing applies them on import.
set -eu

DATA_DIR="${DATA_DIR:-/data}"
mkdir -p "$DATA_DIR"

# The api and worker containers start together and share $DATA_DIR (and the
# default SQLite DB inside it); the lock keeps two `alembic upgrade` runs from
# racing. The second one finds the schema at head and does nothing.
flock "$DATA_DIR/.migrate.lock" alembic upgrade head

exec "$@"
