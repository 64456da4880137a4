"""Fills a stopped keyward's SQLite store with N extra keys, fast: copies of the bootstrap key's
row with fresh ids and random secret hashes (nobody holds their secrets; they exist to make
the tables big). Usage: seed_store.py DB N"""
import os
import sqlite3
import sys

db, n = sys.argv[1], int(sys.argv[2])
ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid_like(i):
    # 26 Crockford base32 characters, unique per i, sorting after real ids of today.
    digits = []
    for _ in range(16):
        digits.append(ULID_ALPHABET[i % 32])
        i //= 32
    return "7ZZZZZZZZZ" + "".join(reversed(digits))


con = sqlite3.connect(db)
columns = [r[1] for r in con.execute("PRAGMA table_info(api_keys)")]
template = con.execute("SELECT * FROM api_keys LIMIT 1").fetchone()
secret_columns = [r[1] for r in con.execute("PRAGMA table_info(key_secrets)")]
secret_template = con.execute("SELECT * FROM key_secrets LIMIT 1").fetchone()
id_at = columns.index("id")
name_at = columns.index("name")
hash_at = secret_columns.index("hash")
key_at = secret_columns.index("key_id")
key_sql = f"INSERT INTO api_keys ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
secret_sql = f"INSERT INTO key_secrets ({', '.join(secret_columns)}) VALUES ({', '.join('?' * len(secret_columns))})"
con.execute("BEGIN")
batch_keys, batch_secrets = [], []
for i in range(n):
    key_id = "key_" + ulid_like(i)
    row = list(template)
    row[id_at] = key_id
    row[name_at] = f"seeded {i}"
    batch_keys.append(row)
    secret = list(secret_template)
    secret[hash_at] = os.urandom(32)
    secret[key_at] = key_id
    batch_secrets.append(secret)
    if len(batch_keys) == 50_000:
        con.executemany(key_sql, batch_keys)
        con.executemany(secret_sql, batch_secrets)
        batch_keys, batch_secrets = [], []
con.executemany(key_sql, batch_keys)
con.executemany(secret_sql, batch_secrets)
con.commit()
count = con.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
print(f"{count} keys in {db}", file=sys.stderr)
