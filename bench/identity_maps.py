"""Writes nginx maps and HAProxy map files of each key's identity as keyward sends it upstream,
for the setups that make nginx and HAProxy do keyward's whole job (scenarios k and l of
bench/run.sh). Asks keyward once per key (keep-alive) through its bench route to the upstream's
`/whoami`, which answers with the identity headers it received. The identity token is the one
keyward signed then: nginx and HAProxy cannot sign, so they send it as a fixed value per key,
as keyward sends its cached one between renewals.
Usage: identity_maps.py HOST:PORT KEYS_FILE OUT_DIR
Writes OUT_DIR/nginx-{org,project,scopes,identity}.map (a map per header: nginx cannot split a
value) and OUT_DIR/haproxy-identity.map (one map of `org|project|scopes|token`, which HAProxy
splits with `field()`: one lookup instead of four, ~4 µs of its CPU per request less,
measured)."""
import http.client
import os
import sys

host, keys_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
fields = ("org", "project", "scopes", "identity")
conn = http.client.HTTPConnection(host)
nginx = {f: open(os.path.join(out, f"nginx-{f}.map"), "w") for f in fields}
haproxy = open(os.path.join(out, "haproxy-identity.map"), "w")
with open(keys_file) as keys:
    for key in (line.strip() for line in keys):
        conn.request("GET", "/bench/whoami", headers={"Authorization": "Bearer " + key})
        reply = conn.getresponse()
        values = reply.read().decode().split("|")
        if reply.status != 200 or len(values) != len(fields) or not all(values):
            sys.exit(f"whoami failed: {reply.status} {values}")
        for field, value in zip(fields, values):
            if any(c in value for c in '"\\;|\n '):
                sys.exit(f"{field} value needs quoting the maps do not do: {value!r}")
            nginx[field].write(f'"Bearer {key}" "{value}";\n')
        haproxy.write(f"{key} {'|'.join(values)}\n")
for f in (*nginx.values(), haproxy):
    f.close()
