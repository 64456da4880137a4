"""Writes N random keys in keyward's default format (kw_live_ + 43 base62 + the 6-character
CRC32 checksum), which pass the format check and the checksum but belong to no key: what an
attacker who knows the public format can send. Usage: random_keys.py N OUT"""
import secrets
import sys
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

n, out = int(sys.argv[1]), sys.argv[2]
with open(out, "w") as f:
    for _ in range(n):
        body = "kw_live_" + "".join(secrets.choice(BASE62) for _ in range(43))
        value = zlib.crc32(body.encode())
        digits = ""
        for _ in range(6):
            digits = BASE62[value % 62] + digits
            value //= 62
        f.write(body + digits + "\n")
