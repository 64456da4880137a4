//! Tokens: exchange, JWKS, JWTs as credentials, identity tokens, signing-key rotation, and
//! attacks — checked with an independent implementation (PyJWT) that sees only the JWKS.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestServer, metric, well_inside_a_minute};

const TOOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/jwt_tool.py");

fn tool(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(TOOL)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "jwt_tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What the echo upstream saw of a proxied request that carried a forged identity token.
async fn echo_with_forged_identity(s: &TestServer, key: &str) -> Value {
    let reply = s
        .client
        .get(format!("{}/echo/x", s.base))
        .bearer_auth(key)
        .header("x-keyward-identity", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    reply.json().await.unwrap()
}

async fn exchange(s: &TestServer, key: &str) -> crate::harness::Reply {
    s.call(Method::POST, "/v1/tokens/exchange", Some(key), None)
        .await
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An access token signed with HS256 by `secret`, naming `key_id` of `org`, expiring at
/// `exp` (Unix seconds); `jti` tells tokens with the same claims apart.
fn hs256_token(secret: &str, org: &str, key_id: &str, exp: i64, jti: &str) -> String {
    let claims = json!({"iss": "http://localhost:8080", "sub": key_id, "aud": "keyward",
        "org_id": org, "project_id": "proj_01JZZZZZZZZZZZZZZZZZZZZZZZ", "key_id": key_id,
        "scopes": ["inference"], "iat": exp - 900, "nbf": exp - 900, "exp": exp, "jti": jti})
    .to_string();
    tool(&["hs256", secret, &claims, "kw-access+jwt"])
}

#[tokio::test]
async fn exchanged_tokens_verify_independently_and_work_as_credentials() {
    let mut s = TestServer::start().await;
    let (id, key) = s
        .create_key(json!({"scopes": ["inference", "management"]}))
        .await;
    let r = exchange(&s, &key).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    let token = r.body["token"].as_str().unwrap().to_owned();

    // PyJWT, with nothing but the JWKS document.
    let claims: Value = serde_json::from_str(&tool(&[
        "verify",
        &s.base,
        &token,
        "keyward",
        "http://localhost:8080",
    ]))
    .unwrap();
    assert_eq!(claims["sub"], id.as_str());
    assert_eq!(claims["key_id"], id.as_str());
    assert_eq!(claims["scopes"], json!(["inference", "management"]));
    let org = s.admin(Method::GET, "/v1/org", None).await.body["id"].clone();
    assert_eq!(claims["org_id"], org);
    assert!(claims["project_id"].as_str().unwrap().starts_with("proj_"));
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );
    assert!(claims["jti"].is_string());
    let jwks = s
        .call(Method::GET, "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(jwks.body["keys"][0]["kty"], "OKP");
    assert_eq!(jwks.body["keys"][0]["alg"], "EdDSA");

    // Accepted wherever a key is: the proxy, forward-auth, verify, the management API.
    let echo = s.call(Method::GET, "/echo/x", Some(&token), None).await;
    assert_eq!(echo.status, 200, "{}", echo.text);
    assert_eq!(echo.body["headers"]["x-keyward-key-id"], id.as_str());
    assert!(echo.body["headers"].get("authorization").is_none());
    assert!(echo.header("x-ratelimit-limit").is_some());
    let auth = s
        .client
        .get(format!("{}/v1/auth", s.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(auth.status(), 200);
    let verify = s
        .call(
            Method::POST,
            "/v1/verify",
            None,
            Some(json!({"key": token})),
        )
        .await;
    assert_eq!(verify.body["valid"], true);
    assert_eq!(
        s.call(Method::GET, "/v1/org", Some(&token), None)
            .await
            .status,
        200
    );

    // The upstream gets an identity token it can verify through the JWKS, and it is no
    // access token: it cannot be used as a credential.
    let identity = echo.body["headers"]["x-keyward-identity"]
        .as_str()
        .unwrap()
        .to_owned();
    let id_claims: Value = serde_json::from_str(&tool(&[
        "verify",
        &s.base,
        &identity,
        "keyward-upstream",
        "http://localhost:8080",
    ]))
    .unwrap();
    assert_eq!(id_claims["key_id"], id.as_str());
    assert!(id_claims["exp"].as_i64().unwrap() - id_claims["iat"].as_i64().unwrap() <= 60);
    s.call(Method::GET, "/echo/x", Some(&identity), None)
        .await
        .assert_error(401, "invalid_token");
    // A client-sent identity header never reaches the upstream.
    let seen = echo_with_forged_identity(&s, &key).await;
    assert_ne!(seen["headers"]["x-keyward-identity"], "forged");

    // A token cannot be exchanged for a longer-lived one.
    exchange(&s, &token)
        .await
        .assert_error(401, "invalid_token");

    // The master key was generated into the data directory, private, and never logged.
    let master = s.dir.path().join("keyward-data/master.key");
    let value = std::fs::read_to_string(&master).unwrap();
    assert_eq!(value.trim().len(), 43);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&master).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Stopped first, so that every line it wrote has been read.
    s.stop().await;
    let logs = s.stdout() + &s.stderr();
    assert!(logs.contains("generated a new master key"));
    assert!(!logs.contains(value.trim()), "the master key was logged");
    assert!(!logs.contains(&token), "a token was logged");
}

#[tokio::test]
async fn the_exchange_path_is_configurable() {
    let s = TestServer::start_with(&[("KEYWARD_TOKENS__EXCHANGE_PATH", "/api/v1/tokens/exchange")])
        .await;
    let (_, key) = s.create_key(json!({})).await;
    let r = s
        .call(Method::POST, "/api/v1/tokens/exchange", Some(&key), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["expires_in"], 900);
    exchange(&s, &key)
        .await
        .assert_error(404, "route_not_found");
}

#[tokio::test]
async fn the_identity_token_can_be_left_out() {
    let s = TestServer::start_with(&[("KEYWARD_TOKENS__IDENTITY_TOKEN", "false")]).await;
    let (id, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    // The upstream gets the plain identity headers only (made now, then cached), and a
    // client-sent token is still dropped, not passed on in the signed one's place.
    let seen = echo_with_forged_identity(&s, &key).await;
    assert_eq!(seen["headers"]["x-keyward-key-id"], id.as_str());
    assert_eq!(seen["headers"]["x-keyward-scopes"], "inference");
    assert!(
        seen["headers"].get("x-keyward-identity").is_none(),
        "{seen}"
    );
    // Forward-auth answers likewise, from the cached headers.
    let auth = s.call(Method::GET, "/v1/auth", Some(&key), None).await;
    assert_eq!(auth.status, 200, "{}", auth.text);
    assert_eq!(auth.header("x-keyward-key-id"), Some(id.as_str()));
    assert_eq!(auth.header("x-keyward-identity"), None);
    // Exchanged tokens are another matter: still issued and accepted.
    let token = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let echo = s.call(Method::GET, "/echo/x", Some(&token), None).await;
    assert_eq!(echo.status, 200, "{}", echo.text);
    assert_eq!(echo.body["headers"]["x-keyward-key-id"], id.as_str());
    assert!(echo.body["headers"].get("x-keyward-identity").is_none());
}

#[tokio::test]
async fn forged_and_tampered_tokens_are_refused() {
    let s = TestServer::start().await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let token = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for forged in [
        tool(&["forge-none", &token]),
        tool(&["forge-hs256-public", &s.base, &token]),
        tool(&["tamper", &token]),
        tool(&["rekid", &token]),
        format!("{token}x"),
        "eyJhbGciOiJFZERTQSJ9.e30.".to_owned(),
    ] {
        let r = s.call(Method::GET, "/echo/x", Some(&forged), None).await;
        r.assert_error(401, "invalid_token");
    }
    // The tampered token would have carried research; it was refused, not trusted.
    let r = s
        .call(
            Method::POST,
            "/v1/verify",
            None,
            Some(json!({"key": tool(&["tamper", &token])})),
        )
        .await;
    assert_eq!(r.body, json!({"valid": false, "code": "invalid_token"}));
}

#[tokio::test]
async fn revoking_the_key_ends_its_tokens_at_once() {
    let s = TestServer::start().await;
    let (id, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let token = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&token), None)
            .await
            .status,
        200
    );
    s.admin(Method::DELETE, &format!("/v1/keys/{id}"), None)
        .await;
    s.call(Method::GET, "/echo/x", Some(&token), None)
        .await
        .assert_error(401, "key_revoked");
    // Scopes come from the token and must still be on the key: a token cannot reach a route
    // its key was not allowed on.
    let (_, narrow) = s.create_key(json!({"scopes": ["research"]})).await;
    let narrow_token = exchange(&s, &narrow).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    s.call(Method::GET, "/echo/x", Some(&narrow_token), None)
        .await
        .assert_error(403, "insufficient_scope");
}

#[tokio::test]
async fn hs256_mode_and_expired_tokens() {
    let secret = "an-hs256-secret-of-at-least-32-bytes!!";
    let s = TestServer::start_with(&[
        ("KEYWARD_TOKENS__ALGORITHM", "HS256"),
        ("KEYWARD_TOKENS__HS256_SECRET", secret),
    ])
    .await;
    let (id, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let token = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&token), None)
            .await
            .status,
        200
    );
    assert_eq!(
        s.call(Method::GET, "/.well-known/jwks.json", None, None)
            .await
            .body,
        json!({"keys": []})
    );

    let org = s.admin(Method::GET, "/v1/org", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let claims = |exp: i64| {
        json!({"iss": "http://localhost:8080", "sub": id, "aud": "keyward", "org_id": org,
               "project_id": "proj_01JZZZZZZZZZZZZZZZZZZZZZZZ", "key_id": id, "scopes": ["inference"],
               "iat": exp - 900, "nbf": exp - 900, "exp": exp, "jti": "x"})
        .to_string()
    };
    // Expired beyond the 30 s leeway.
    let expired = tool(&["hs256", secret, &claims(now() - 120), "kw-access+jwt"]);
    s.call(Method::GET, "/echo/x", Some(&expired), None)
        .await
        .assert_error(401, "expired_token");
    // Within the leeway it still passes.
    let recent = tool(&["hs256", secret, &claims(now() - 5), "kw-access+jwt"]);
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&recent), None)
            .await
            .status,
        200
    );
    // A token that verified is remembered (no second signature check), but not past its
    // expiry: 6 s of leeway left now (time for Python to sign it on a loaded machine), none
    // after the pause.
    let expiring = tool(&["hs256", secret, &claims(now() - 24), "kw-access+jwt"]);
    assert_eq!(
        s.call(Method::GET, "/echo/x", Some(&expiring), None)
            .await
            .status,
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(7_500)).await;
    s.call(Method::GET, "/echo/x", Some(&expiring), None)
        .await
        .assert_error(401, "expired_token");
    // Wrong secret, wrong typ.
    let wrong = tool(&[
        "hs256",
        "another-secret-of-at-least-32-bytes!!!",
        &claims(now() + 600),
        "kw-access+jwt",
    ]);
    s.call(Method::GET, "/echo/x", Some(&wrong), None)
        .await
        .assert_error(401, "invalid_token");
    let identity_typ = tool(&["hs256", secret, &claims(now() + 600), "kw-identity+jwt"]);
    s.call(Method::GET, "/echo/x", Some(&identity_typ), None)
        .await
        .assert_error(401, "invalid_token");
}

#[tokio::test]
async fn an_address_sending_forged_tokens_is_cut_off_from_signature_checks() {
    let secret = "an-hs256-secret-of-at-least-32-bytes!!";
    let s = TestServer::start_with_config(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[cache]\nunknown_keys_per_client = 3\n",
        &[
            ("KEYWARD_TOKENS__ALGORITHM", "HS256"),
            ("KEYWARD_TOKENS__HS256_SECRET", secret),
        ],
    )
    .await;
    let (id, _) = s.create_key(json!({"scopes": ["inference"]})).await;
    let org = s.admin(Method::GET, "/v1/org", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let signed = |secret: &str, exp: i64, jti: &str| hs256_token(secret, &org, &id, exp, jti);
    let forger = "another-secret-of-at-least-32-bytes!!!";
    let [used, fresh, forged] = [(secret, "used"), (secret, "fresh"), (forger, "forged")]
        .map(|(secret, jti)| signed(secret, now() + 600, jti));
    let [expired, expired_elsewhere] =
        ["expired", "expired elsewhere"].map(|jti| signed(secret, now() - 120, jti));
    let from = async |client: &str, token: &str| s.get_from("/echo/x", token, client).await;
    let client = "198.51.100.7";
    assert_eq!(from(client, &used).await.status, 200);
    well_inside_a_minute(Duration::from_secs(15)).await;
    // An expired token costs its client one check, then it is remembered: replayed, it costs
    // nothing more. Refusals that need no signature check (an undecodable header, an
    // unknown `kid`) cost little and are not counted.
    for _ in 0..3 {
        from(client, &expired)
            .await
            .assert_error(401, "expired_token");
    }
    let unknown_kid = tool(&["rekid", &used]);
    // Over 8 KiB: refused before it is even hashed.
    let oversized = format!("{forged}{}", "A".repeat(9 * 1024));
    for cheap in [
        "eyJhbGciOiJFZERTQSJ9.e30.",
        &unknown_kid,
        "eyJ.x.y",
        &oversized,
    ] {
        from(client, cheap).await.assert_error(401, "invalid_token");
    }
    // A body's `ip` (the end user's, for the key's IP rules) does not choose who is charged:
    // `/v1/verify` charges the address the request came from.
    let verify_from = async |client: &str, ip: &str| {
        let request = s
            .client
            .post(format!("{}/v1/verify", s.base))
            .header("X-Forwarded-For", client)
            .json(&json!({"key": forged, "ip": ip}));
        TestServer::read(request.send().await.unwrap()).await
    };
    let r = verify_from(client, "203.0.113.1").await;
    assert_eq!(r.body, json!({"valid": false, "code": "invalid_token"}));
    // The third signature checked and refused reaches the bound; past it, none is checked.
    from(client, &forged)
        .await
        .assert_error(401, "invalid_token");
    let r = verify_from(client, "203.0.113.2").await;
    assert_eq!(r.body["code"], "rate_limit_exceeded", "{}", r.text);
    let refused = from(client, &forged).await;
    refused.assert_error(429, "rate_limit_exceeded");
    let retry = refused.retry_after();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Tokens checked before cost no check and are answered as before; one never seen
    // waits, as an unknown key would; another address is not affected.
    assert_eq!(from(client, &used).await.status, 200);
    from(client, &expired)
        .await
        .assert_error(401, "expired_token");
    for never_seen in [&fresh, &expired_elsewhere] {
        from(client, never_seen)
            .await
            .assert_error(429, "rate_limit_exceeded");
    }
    assert_eq!(from("198.51.100.8", &fresh).await.status, 200);
    assert_eq!(
        metric(&s.metrics().await, "keyward_invalid_tokens_refused_total"),
        4.0
    );
}

#[tokio::test]
async fn past_the_nodes_bound_only_tokens_naming_a_known_key_are_checked() {
    let secret = "an-hs256-secret-of-at-least-32-bytes!!";
    let s = TestServer::start_with_config(
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [cache]\nunknown_keys_per_client = 0\nforged_tokens_per_node = 6\n",
        &[
            ("KEYWARD_TOKENS__ALGORITHM", "HS256"),
            ("KEYWARD_TOKENS__HS256_SECRET", secret),
        ],
    )
    .await;
    let org = s.admin(Method::GET, "/v1/org", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let signed =
        |secret: &str, key_id: &str, jti: &str| hs256_token(secret, &org, key_id, now() + 600, jti);
    let forger = "another-secret-of-at-least-32-bytes!!!";
    // The flood copies the claims of a token for key `copied`; `other` is a key in use too.
    let (copied, _) = s.create_key(json!({"scopes": ["inference"]})).await;
    let (other, _) = s.create_key(json!({"scopes": ["inference"]})).await;
    let [copied_used, copied_fresh] = ["used", "fresh"].map(|jti| signed(secret, &copied, jti));
    let [other_used, other_fresh] = ["used", "fresh"].map(|jti| signed(secret, &other, jti));
    let forged: Vec<String> = (0..11)
        .map(|n| signed(forger, &copied, &format!("forged {n}")))
        .collect();
    let forged_other: Vec<String> = (0..3)
        .map(|n| signed(forger, &other, &format!("forged {n}")))
        .collect();
    let made_up = signed(forger, "key_01JZZZZZZZZZZZZZZZZZZZZZZZ", "made up");
    let mut client = 0u8;
    let mut from_a_new_client = async |token: &str| {
        client += 1;
        let address = format!("198.51.100.{client}");
        s.get_from("/echo/x", token, &address).await
    };
    for used in [&copied_used, &other_used] {
        assert_eq!(from_a_new_client(used).await.status, 200);
    }
    well_inside_a_minute(Duration::from_secs(15)).await;
    // Six forged signatures reach the node's bound; past it, tokens naming `copied` are
    // still checked until that key has failed ten checks this minute.
    for token in &forged[..10] {
        from_a_new_client(token)
            .await
            .assert_error(401, "invalid_token");
    }
    let refused = from_a_new_client(&forged[10]).await;
    refused.assert_error(429, "rate_limit_exceeded");
    assert!((1..=60).contains(&refused.retry_after()));
    // A key this node does not know is not worth a check, nor is a new token for the key
    // the flood names; a new token for another key in use is checked, tokens checked before
    // are answered as before.
    for unchecked in [&made_up, &copied_fresh] {
        from_a_new_client(unchecked)
            .await
            .assert_error(429, "rate_limit_exceeded");
    }
    for token in [&other_fresh, &copied_used, &other_used] {
        assert_eq!(from_a_new_client(token).await.status, 200);
    }
    // Past twice the node's bound (12 failed checks), no new token is checked at all.
    for token in &forged_other[..2] {
        from_a_new_client(token)
            .await
            .assert_error(401, "invalid_token");
    }
    from_a_new_client(&forged_other[2])
        .await
        .assert_error(429, "rate_limit_exceeded");
    assert_eq!(from_a_new_client(&other_used).await.status, 200);
    assert_eq!(
        metric(&s.metrics().await, "keyward_invalid_tokens_refused_total"),
        4.0
    );
}

#[tokio::test]
async fn signing_key_rotation_keeps_old_tokens_valid() {
    let s = TestServer::start().await;
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let before = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (st, out, err) =
        crate::harness::cli(s.dir.path(), &["jwt", "rotate-signing-key"], None, &[]);
    assert!(st.success(), "{err}");
    assert!(out.contains("now signing with"), "{out}");
    // The server reloads its keys within 10 s; afterwards new tokens carry the new kid.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let jwks = s
            .call(Method::GET, "/.well-known/jwks.json", None, None)
            .await;
        if jwks.body["keys"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let after = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let kid = |t: &str| tool(&["verify", &s.base, t, "keyward", "http://localhost:8080"]);
    assert_ne!(
        before.split('.').next(),
        after.split('.').next(),
        "a new kid signs"
    );
    // Both verify, with the server and independently.
    for token in [&before, &after] {
        assert_eq!(
            s.call(Method::GET, "/echo/x", Some(token), None)
                .await
                .status,
            200
        );
        assert!(kid(token).contains("key_id"));
    }
}

const PROXY_SECRET: &str = "a-frontend-secret-of-at-least-32-bytes";

#[tokio::test]
async fn proxy_auth_jwts_count_only_on_the_internal_listener() {
    let s = TestServer::start_with(&[("KEYWARD_AUTH__PROXY_JWT_SECRET", PROXY_SECRET)]).await;
    let org = s.admin(Method::GET, "/v1/org", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let user = "usr_01JZZZZZZZZZZZZZZZZZZZZZZZ";
    let mint = |secret: &str, aud: &str, iat: i64, exp: i64, scopes: Value| {
        let claims = json!({"sub": user, "org_id": org, "project_id": null, "scopes": scopes,
                            "aud": aud, "iat": iat, "exp": exp});
        tool(&["hs256", secret, &claims.to_string(), "JWT"])
    };
    let good = mint(
        PROXY_SECRET,
        "keyward-proxy",
        now(),
        now() + 30,
        json!(["inference", "management"]),
    );
    let call = |base: String, path: &'static str, header: String| {
        let client = s.client.clone();
        async move {
            let r = client
                .get(format!("{base}{path}"))
                .header("x-keyward-proxy-auth", header)
                .send()
                .await
                .unwrap();
            TestServer::read(r).await
        }
    };

    // Internal listener: the user acts, through the gateway and the management API.
    let echo = call(s.internal.clone(), "/echo/x", good.clone()).await;
    assert_eq!(echo.status, 200, "{}", echo.text);
    assert_eq!(echo.body["headers"]["x-keyward-user-id"], user);
    assert_eq!(echo.body["headers"]["x-keyward-org-id"], org.as_str());
    assert!(echo.body["headers"].get("x-keyward-key-id").is_none());
    assert!(
        echo.body["headers"].get("x-keyward-proxy-auth").is_none(),
        "the proxy token reached the upstream"
    );
    assert!(
        echo.header("x-ratelimit-limit").is_some(),
        "the organisation's limits apply"
    );
    let org_reply = call(s.internal.clone(), "/v1/org", good.clone()).await;
    assert_eq!(org_reply.status, 200, "{}", org_reply.text);
    let created = s
        .client
        .post(format!("{}/v1/keys", s.internal))
        .header("x-keyward-proxy-auth", &good)
        .json(&json!({"name": "made by a user"}))
        .send()
        .await
        .unwrap();
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["created_by"], user);

    // Public listener: ignored.
    call(s.base.clone(), "/echo/x", good.clone())
        .await
        .assert_error(401, "missing_credentials");
    call(s.base.clone(), "/v1/org", good.clone())
        .await
        .assert_error(401, "missing_credentials");

    // Refused: too long-lived, wrong audience, wrong secret, expired, missing scope, and
    // keyward's own access token in the proxy header.
    let (_, key) = s.create_key(json!({"scopes": ["inference"]})).await;
    let access = exchange(&s, &key).await.body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for (token, code) in [
        (
            mint(
                PROXY_SECRET,
                "keyward-proxy",
                now(),
                now() + 600,
                json!(["inference"]),
            ),
            "invalid_token",
        ),
        (
            mint(
                PROXY_SECRET,
                "keyward",
                now(),
                now() + 30,
                json!(["inference"]),
            ),
            "invalid_token",
        ),
        (
            mint(
                "some-other-secret-of-at-least-32-bytes",
                "keyward-proxy",
                now(),
                now() + 30,
                json!(["inference"]),
            ),
            "invalid_token",
        ),
        (
            mint(
                PROXY_SECRET,
                "keyward-proxy",
                now() - 150,
                now() - 100,
                json!(["inference"]),
            ),
            "expired_token",
        ),
        (access, "invalid_token"),
    ] {
        call(s.internal.clone(), "/echo/x", token)
            .await
            .assert_error(401, code);
    }
    let no_scope = mint(
        PROXY_SECRET,
        "keyward-proxy",
        now(),
        now() + 30,
        json!(["research"]),
    );
    call(s.internal.clone(), "/echo/x", no_scope)
        .await
        .assert_error(403, "insufficient_scope");
}
