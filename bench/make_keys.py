"""Creates N keys through keyward's management API (keep-alive, so 10,000 take seconds) and
writes their secrets to OUT, one per line, and their ids to OUT.ids in the same order (what
the nginx and HAProxy setups pass upstream, as keyward does). Usage: make_keys.py HOST:PORT
ADMIN_KEY N OUT"""
import http.client
import json
import sys

host, admin, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection(host)
body = json.dumps({"quota_requests": 1000000000, "quota_window": 60})
headers = {"Authorization": "Bearer " + admin, "Content-Type": "application/json"}
with open(out, "w") as f, open(out + ".ids", "w") as ids:
    for _ in range(n):
        conn.request("POST", "/v1/keys", body, headers)
        reply = conn.getresponse()
        data = json.loads(reply.read())
        if reply.status != 201:
            sys.exit(f"create failed: {reply.status} {data}")
        f.write(data["key"] + "\n")
        ids.write(data["id"] + "\n")
