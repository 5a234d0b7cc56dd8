#!/bin/sh
# Trust the Portcullis CA (its public certificate, which the proxy's container writes to the
# shared ca-public volume at start), then run the agent's command as the unprivileged user.
set -eu
CA=${PORTCULLIS_CA_FILE:-/portcullis-ca/portcullis-ca.pem}
i=0
while [ ! -s "$CA" ]; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then
        echo "agent: no Portcullis CA at $CA after 60 s (is the portcullis service up?)" >&2
        exit 1
    fi
    sleep 0.5
done
# What `portcullis env --shell` prints for the system store:
cp "$CA" /usr/local/share/ca-certificates/portcullis.crt && update-ca-certificates >/dev/null
exec setpriv --reuid=agent --regid=agent --init-groups --inh-caps=-all -- "$@"
