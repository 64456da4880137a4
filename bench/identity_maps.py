"""Writes nginx maps and an HAProxy map of each key's identity as keyward sends it upstream,
for the setups that make nginx and HAProxy do keyward's whole job (scenarios k and l of
bench/run.sh). Asks keyward once per key (keep-alive) through its bench route to the upstream's
`/whoami`, which answers with the identity headers it received. The identity token is the one
keyward signed then: nginx and HAProxy do not sign, so they send it as a fixed string per key.
Usage: identity_maps.py HOST:PORT KEYS_FILE OUT_DIR (KEYS_FILE.ids holds the keys' ids).
Writes OUT_DIR/nginx-{org,project,scopes,identity}.map, by key id (nginx finds the id from the
header with nginx-keys.map, and cannot split one value into several), and
OUT_DIR/haproxy-identity.map, by secret: `id|org|project|scopes|token`, which HAProxy splits
with `field()` (one lookup instead of five: ~4 µs of its CPU per request less, measured)."""
import http.client
import os
import sys

host, keys_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
fields = ("org", "project", "scopes", "identity")
conn = http.client.HTTPConnection(host)
nginx = {f: open(os.path.join(out, f"nginx-{f}.map"), "w") for f in fields}
haproxy = open(os.path.join(out, "haproxy-identity.map"), "w")
with open(keys_file) as keys, open(keys_file + ".ids") as ids:
    for key, key_id in zip((line.strip() for line in keys), (line.strip() for line in ids)):
        conn.request("GET", "/bench/whoami", headers={"Authorization": "Bearer " + key})
        reply = conn.getresponse()
        values = reply.read().decode().split("|")
        if reply.status != 200 or len(values) != len(fields) or not all(values):
            # The fields only by count: the answer holds a signed token.
            sys.exit(f"whoami failed: HTTP {reply.status}, {sum(map(bool, values))} of {len(fields)} fields")
        for field, value in zip(fields, values):
            # Characters the map files would have to quote or escape (nginx expands `$`).
            if any(c in value for c in '"\\;|$\n '):
                sys.exit(f"the {field} value needs quoting the maps do not do")
            nginx[field].write(f'{key_id} "{value}";\n')
        haproxy.write(f"{key} {key_id}|{'|'.join(values)}\n")
for f in (*nginx.values(), haproxy):
    f.close()
