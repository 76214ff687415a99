#!/usr/bin/env bash
# The real downstream systems the tests drive (issue 14): Zabbix 6.0's API (its PHP frontend, which the tests serve
# with `php -S`, on a database of the local PostgreSQL) and Prometheus, both from Debian's packages.
# Idempotent: once installed and loaded, a run only checks and takes well under a second.
set -euo pipefail

export PGOPTIONS="-c client_min_messages=warning"  # no NOTICE for the DROP ... IF EXISTS
PG=(-h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)
SQL_DIR=/usr/share/zabbix-server-pgsql
CONF=/etc/zabbix/zabbix.conf.php
# php8.2-cgi satisfies the frontend's "php" dependency, which would otherwise pull in apache2 and its module.
PACKAGES=(zabbix-server-pgsql zabbix-frontend-php php8.2-cgi php8.2-cli php8.2-pgsql prometheus)

missing=()
for pkg in "${PACKAGES[@]}"; do
  [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null)" == "ii " ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "downstream: installing ${missing[*]}"
  # Packages must not start daemons here (the Debian image's policy-rc.d says so; keep it true where it is absent):
  # the tests start their own instances on free ports, and a stray prometheus or zabbix_server only costs CPU.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}" >/dev/null
fi

version="$(dpkg-query -W -f='${Version}' zabbix-frontend-php)"
case "$version" in
  1:6.0.*) ;;
  *) echo "downstream: zabbix-frontend-php is $version; the tests expect Debian 12's Zabbix 6.0" >&2; exit 1 ;;
esac

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "downstream: PostgreSQL does not answer on 127.0.0.1:5432" >&2
  exit 1
fi

# The schema is loaded into zabbix_load and renamed to zabbix only when complete, so that a run cut short (data.sql
# commits on its own, so one transaction cannot cover the three files) is redone from scratch, never half kept.
if [[ "$(psql "${PG[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'zabbix'")" != 1 ]]; then
  echo "downstream: loading the Zabbix schema into the database zabbix"
  psql "${PG[@]}" -d postgres \
    -c "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'zabbix') THEN CREATE ROLE zabbix LOGIN; END IF; END\$\$" \
    -c "DROP DATABASE IF EXISTS zabbix_load WITH (FORCE)" \
    -c "CREATE DATABASE zabbix_load OWNER zabbix ENCODING 'UTF8' TEMPLATE template0"
  for part in schema images data; do
    zcat "$SQL_DIR/$part.sql.gz" | psql "${PG[@]}" -U zabbix -d zabbix_load >/dev/null
  done
  psql "${PG[@]}" -d postgres -c "ALTER DATABASE zabbix_load RENAME TO zabbix"
fi
# This PostgreSQL runs with autovacuum off, so a fresh load has no statistics and the planner picks plans that
# take minutes (linking a template hung > 3 min in a trigger-dependency query). ANALYZE on every run: ~1 s.
psql "${PG[@]}" -d zabbix -c "ANALYZE" >/dev/null

# What the frontend reads (CConfigFile::CONFIG_FILE_PATH); trust authentication, so no password.
conf="$(cat <<'PHP'
<?php
// Written by rwatch's .ci/downstream.sh: the Zabbix frontend on the local PostgreSQL, for the tests.
$DB['TYPE']           = 'POSTGRESQL';
$DB['SERVER']         = '127.0.0.1';
$DB['PORT']           = '5432';
$DB['DATABASE']       = 'zabbix';
$DB['USER']           = 'zabbix';
$DB['PASSWORD']       = '';
$DB['SCHEMA']         = '';
$DB['ENCRYPTION']     = false;
$DB['KEY_FILE']       = '';
$DB['CERT_FILE']      = '';
$DB['CA_FILE']        = '';
$DB['VERIFY_HOST']    = false;
$DB['CIPHER_LIST']    = '';
$DB['VAULT_URL']      = '';
$DB['VAULT_DB_PATH']  = '';
$DB['VAULT_TOKEN']    = '';
$DB['DOUBLE_IEEE754'] = true;
$ZBX_SERVER_NAME      = 'rwatch tests';
$IMAGE_FORMAT_DEFAULT = IMAGE_FORMAT_PNG;
PHP
)"
if [[ "$(cat "$CONF" 2>/dev/null)" != "$conf" ]]; then
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
fi

echo "downstream: zabbix ${version#1:} on database zabbix, prometheus $(dpkg-query -W -f='${Version}' prometheus)"
