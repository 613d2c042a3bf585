#!/usr/bin/env bash
# Runs once, as postgres, when the db container initialises an empty data volume
# (docker-entrypoint-initdb.d): binds the walkeep repository to this new cluster, and
# creates the application's role. If the repository volume already belongs to another
# cluster, `walkeep init` refuses and the container does not start: see README.md.
set -Eeuo pipefail

walkeep init --config /etc/walkeep/walkeep.toml --pgdata "$PGDATA"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set app_password="$APP_DB_PASSWORD" <<'SQL'
CREATE ROLE app LOGIN PASSWORD :'app_password';
ALTER DATABASE :"DBNAME" OWNER TO app;
ALTER SCHEMA public OWNER TO app;
SQL
