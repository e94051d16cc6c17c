#!/usr/bin/env bash
# A throw-away PostgreSQL server on 127.0.0.1 for the distributed tests.
#   source .ci/postgres.sh; pg_start   -> exports DYNAS_TEST_POSTGRES_URL
#   pg_stop                             -> stops the server and removes its data directory
pg_start() {
    local bindir
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        echo "+ installing PostgreSQL from the Debian packages"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    PG_DIR=$(mktemp -d /tmp/dynas-pg.XXXXXX)
    PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    local as_pg=()
    if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root
        chown postgres "$PG_DIR"
        as_pg=(runuser -u postgres --)
    fi
    "${as_pg[@]}" "$bindir/initdb" -D "$PG_DIR/data" -U dynas --auth=trust -E UTF8 >/dev/null
    "${as_pg[@]}" "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c max_connections=200 -c fsync=off" start >/dev/null
    "${as_pg[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$PG_PORT" -U dynas dynas_test
    PG_CTL="$bindir/pg_ctl"
    PG_AS=("${as_pg[@]}")
    export DYNAS_TEST_POSTGRES_URL="postgresql://dynas@127.0.0.1:$PG_PORT/dynas_test"
    echo "+ PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
}

pg_stop() {
    if [ -n "${PG_DIR:-}" ]; then
        "${PG_AS[@]}" "$PG_CTL" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}
