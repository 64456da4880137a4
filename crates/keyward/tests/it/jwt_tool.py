"""An independent JWT implementation (PyJWT) for keyward's token tests.

verify BASE TOKEN AUD ISS      verify with only the JWKS document; print the claims
forge-none TOKEN               same claims, alg "none", no signature
forge-hs256-public BASE TOKEN  same claims, HS256 signed with the Ed25519 public key
tamper TOKEN                   scopes changed, signature kept
rekid TOKEN                    kid changed, signature kept
hs256 SECRET CLAIMS_JSON TYP   sign claims with HS256 and the given secret
"""
import base64
import json
import sys
import urllib.request

import jwt


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parts(token):
    h, p, s = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p)), s


def jwks(base):
    return json.load(urllib.request.urlopen(base + "/.well-known/jwks.json"))


def main():
    cmd = sys.argv[1]
    if cmd == "verify":
        base, token, aud, iss = sys.argv[2:6]
        kid = jwt.get_unverified_header(token)["kid"]
        jwk = next(k for k in jwks(base)["keys"] if k["kid"] == kid)
        key = jwt.PyJWK(jwk).key
        print(json.dumps(jwt.decode(token, key, algorithms=["EdDSA"], audience=aud, issuer=iss)))
    elif cmd == "forge-none":
        header, payload, _ = parts(sys.argv[2])
        header["alg"] = "none"
        print(b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode()) + ".")
    elif cmd == "forge-hs256-public":
        base, token = sys.argv[2:4]
        header, payload, _ = parts(token)
        x = unb64(next(k for k in jwks(base)["keys"] if k["kid"] == header["kid"])["x"])
        headers = {"kid": header["kid"], "typ": header["typ"]}
        print(jwt.encode(payload, x, algorithm="HS256", headers=headers))
    elif cmd == "tamper":
        h, p, s = sys.argv[2].split(".")
        payload = json.loads(unb64(p))
        payload["scopes"] = ["inference", "management", "research"]
        print(h + "." + b64(json.dumps(payload).encode()) + "." + s)
    elif cmd == "rekid":
        h, p, s = sys.argv[2].split(".")
        header = json.loads(unb64(h))
        header["kid"] = "kw_somebody_else"
        print(b64(json.dumps(header).encode()) + "." + p + "." + s)
    elif cmd == "hs256":
        secret, claims, typ = sys.argv[2:5]
        print(jwt.encode(json.loads(claims), secret, algorithm="HS256", headers={"kid": "hs256", "typ": typ}))
    else:
        sys.exit("unknown command " + cmd)


main()
