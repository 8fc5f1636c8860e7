#!/usr/bin/env bash
# A self-signed CA and a gateway certificate for local TLS (and a client certificate for mTLS).
#   bash deploy/make-tls-cert.sh [DIR] [extra SAN, e.g. DNS:chat.example.com]
# Writes DIR/ca.crt, DIR/server.{crt,key}, DIR/client.{crt,key} (default DIR deploy/.build/tls).
set -euo pipefail
dir=${1:-deploy/.build/tls}
extra=${2:+,$2}
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=kvgate local CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
sign() {  # name, subject, extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
sign server "/CN=kvgate gateway" "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:gateway${extra}"
sign client "/CN=kvgate client" "extendedKeyUsage=clientAuth"
chmod 600 ./*.key
# The gateway container runs as uid 10001 and reads server.key through a bind mount
# (deploy/compose.tls.yaml); this is a local, self-signed certificate.
chmod 644 server.key
echo "TLS files in $(pwd): ca.crt server.crt server.key client.crt client.key"
