#!/usr/bin/env bash
# docker/init.sh: the one-shot `init` service of docker/compose.yaml. It runs
# in the Custos image as the custos user and writes, for a trial only:
#
#   /var/lib/custos/dev/ (volume "dev", shared with the replicas), by
#   scripts/dev-env: a throwaway CA (pki/ca.pem, pki/ca.key), client
#   certificates for admin, auditor, service-a and service-b (pki/NAME.pem,
#   NAME.key), a SoftHSM2 token labelled "custos" (softhsm/), its user PIN
#   (user.pin, 0400) and SO PIN (so.pin, 0400). Then, by this script:
#     pki/compose-server.pem, .key  a server certificate from the same CA for
#                                   the replicas' host names (CUSTOS_SERVER_NAMES,
#                                   default "custos-1 custos-2"), localhost and
#                                   127.0.0.1
#     pgpass                        libpq password file for the replicas (0600)
#   /var/lib/custos/pg-password/password (volume "pg-password", shared with the
#   postgres service only): the same password, for POSTGRES_PASSWORD_FILE.
#
# A second run changes nothing. Nothing secret is printed. The CA key and the
# SO PIN sit in the same volume as the token, as with scripts/dev-env: this is
# a development setup, not a deployment (docs/deploy.md).
set -euo pipefail

DEV=/var/lib/custos/dev
PG_DIR=/var/lib/custos/pg-password
DEV_ENV=/usr/local/lib/custos/dev-env
SERVER_NAMES=${CUSTOS_SERVER_NAMES:-custos-1 custos-2}
LEAF_DAYS=397

die() { printf 'init: %s\n' "$*" >&2; exit 1; }

# Runs a command, showing its output only if it fails (openssl is chatty).
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" >&2
    die "failed: $1 ${2:-}"
  fi
}

umask 077

# --- CA, client certificates, token, PINs: scripts/dev-env ------------------
# A no-op once $DEV/custos.yaml exists. Its config and data/ directory are not
# used here: each replica gets its config from docker/custos-N.yaml.
if [ -f "$DEV/custos.yaml" ]; then
  printf 'init: %s already set up by dev-env\n' "$DEV"
else
  "$DEV_ENV" "$DEV" >/dev/null
  printf 'init: dev-env wrote the CA, client certificates and token in %s\n' "$DEV"
fi
PKI=$DEV/pki

# --- a server certificate for the compose host names -------------------------
# dev-env's own server certificate names only localhost.
if [ -f "$PKI/compose-server.pem" ] && [ -f "$PKI/compose-server.key" ]; then
  printf 'init: server certificate present\n'
else
  san="DNS:localhost,IP:127.0.0.1"
  first=""
  for name in $SERVER_NAMES; do
    [[ $name =~ ^[A-Za-z0-9.-]+$ ]] || die "CUSTOS_SERVER_NAMES: bad host name '$name'"
    san="$san,DNS:$name"
    first=${first:-$name}
  done
  [ -n "$first" ] || die "CUSTOS_SERVER_NAMES is empty"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cat > "$tmp/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
  quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -out "$tmp/server.key"
  quiet openssl req -new -key "$tmp/server.key" -subj "/CN=$first" -sha256 \
    -out "$tmp/server.csr"
  quiet openssl x509 -req -in "$tmp/server.csr" \
    -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" \
    -sha256 -days "$LEAF_DAYS" -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$tmp/server.ext" -out "$tmp/server.pem"
  chmod 0600 "$tmp/server.key"
  chmod 0644 "$tmp/server.pem"
  mv "$tmp/server.key" "$PKI/compose-server.key"
  mv "$tmp/server.pem" "$PKI/compose-server.pem"
  printf 'init: server certificate for %s\n' "$san"
fi

# --- the PostgreSQL password ------------------------------------------------
# The postgres service reads it from POSTGRES_PASSWORD_FILE when it first
# creates its database (it starts only after this script succeeded); the
# replicas read it through libpq's PGPASSFILE, so it is neither in their
# config nor in the storage URL that custosd logs at start-up.
if [ -f "$DEV/pgpass" ]; then
  [ -f "$PG_DIR/password" ] ||
    die "$DEV/pgpass exists but $PG_DIR/password does not; remove both volumes (docker compose down -v) and start again"
  printf 'init: PostgreSQL password present\n'
else
  password=$(openssl rand -hex 24)
  # The postgres container runs as another uid: the directory and this file
  # are readable by all, and only the init and postgres services mount them.
  chmod 0755 "$PG_DIR"
  printf '%s\n' "$password" > "$PG_DIR/password.tmp"
  chmod 0444 "$PG_DIR/password.tmp"
  mv -f "$PG_DIR/password.tmp" "$PG_DIR/password"
  # hostname:port:database:username:password; libpq ignores the file unless
  # only its owner can read it.
  printf 'postgres:5432:custos:custos:%s\n' "$password" > "$DEV/pgpass.tmp"
  chmod 0600 "$DEV/pgpass.tmp"
  mv "$DEV/pgpass.tmp" "$DEV/pgpass"
  unset password
  printf 'init: PostgreSQL password written (not shown)\n'
fi

printf 'init: done. Identities: %s/{admin,auditor,service-a,service-b}.pem\n' "$PKI"
