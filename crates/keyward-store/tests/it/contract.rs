use std::sync::Arc;

use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, ProjectId};
use keyward_core::key::{ApiKey, KeyState, SecretValidity};
use keyward_core::key_format::{Environment, KeyHash};
use keyward_store::{
    AuditEntry, Bootstrap, KeyChanges, KeyFilter, Org, PageRequest, Project, RevokeOutcome,
    Rotation, Store, StoreError,
};

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

fn audit(org: &OrgId, action: &str, at: Timestamp) -> AuditEntry {
    AuditEntry {
        id: AuditId::generate(),
        org_id: org.clone(),
        actor: "system".into(),
        action: action.into(),
        target: None,
        ip: None,
        details: serde_json::json!({}),
        created_at: at,
    }
}

fn key(org: &OrgId, project: &ProjectId) -> ApiKey {
    ApiKey {
        id: KeyId::generate(),
        org_id: org.clone(),
        project_id: project.clone(),
        name: "k".into(),
        environment: Environment::Live,
        hint: "kw_live_…0000".into(),
        scopes: vec!["inference".into()],
        expires_at: None,
        allowed_ips: vec!["10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}"))],
        blocked_ips: vec![],
        endpoint: None,
        quota_requests: 60,
        quota_window: 60,
        remaining: Some(5),
        refill: None,
        credits_version: 0,
        meta: serde_json::Map::from_iter([("team".to_owned(), serde_json::json!("ml"))]),
        created_at: T0,
        created_by: "cli".into(),
        last_used_at: None,
        revoked_at: None,
        previous_valid_until: None,
    }
}

fn hash(n: u8) -> KeyHash {
    KeyHash::of(&[n; 40])
}

/// An org with one project and one key, written through `bootstrap`.
async fn seeded(store: &Arc<dyn Store>) -> (Org, Project, ApiKey) {
    let org = Org {
        id: OrgId::generate(),
        name: "Default".into(),
        tier: "free".into(),
        default_project_id: None,
        created_at: T0,
    };
    let project = Project {
        id: ProjectId::generate(),
        org_id: org.id.clone(),
        slug: "default".into(),
        name: "Default".into(),
        key_prefix: "kw_{env}_".into(),
        created_at: T0,
    };
    let k = key(&org.id, &project.id);
    let b = Bootstrap {
        org: org.clone(),
        project: project.clone(),
        key: k.clone(),
        key_hash: hash(1),
        audit: audit(&org.id, "key.created", T0),
    };
    assert!(store.bootstrap(&b).await.unwrap_or_else(|e| panic!("{e}")));
    let org = store
        .get_org(&org.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (org, project, k)
}

pub async fn bootstrap_happens_once(store: Arc<dyn Store>) {
    assert!(
        store
            .first_org()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    let (org, project, k) = seeded(&store).await;
    assert_eq!(org.default_project_id.as_ref(), Some(&project.id));
    let again = Bootstrap {
        org: Org {
            id: OrgId::generate(),
            ..org.clone()
        },
        project: Project {
            id: ProjectId::generate(),
            ..project.clone()
        },
        key: key(&org.id, &project.id),
        key_hash: hash(2),
        audit: audit(&org.id, "key.created", T0),
    };
    assert!(
        !store
            .bootstrap(&again)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let first = store.first_org().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.map(|o| o.id), Some(org.id.clone()));
    assert!(
        store
            .find_by_hash(&hash(2))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    let found = store
        .find_by_hash(&hash(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(found.as_ref().map(|f| &f.key), Some(&k));
    assert_eq!(
        found.as_ref().map(|f| f.validity),
        Some(SecretValidity { valid_until: None })
    );
    assert_eq!(found.map(|f| f.org_tier).as_deref(), Some("free"));
}

pub async fn key_lifecycle(store: Arc<dyn Store>) {
    let (org, project, _) = seeded(&store).await;
    let mut k = key(&org.id, &project.id);
    store
        .create_key(&k, &hash(7), &audit(&org.id, "key.created", T0))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.get_key(&org.id, &k.id).await.ok(), Some(k.clone()));

    // Another org cannot see it.
    let other = OrgId::generate();
    assert!(matches!(
        store.get_key(&other, &k.id).await,
        Err(StoreError::NotFound)
    ));

    k.name = "renamed".into();
    k.expires_at = Some(T0.plus_secs(60));
    k.blocked_ips = vec!["2001:db8::/32".parse().unwrap_or_else(|e| panic!("{e}"))];
    store
        .update_key(&k, &audit(&org.id, "key.updated", T0))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.get_key(&org.id, &k.id).await.ok(), Some(k.clone()));

    let outcome = store
        .revoke_key(&org.id, &k.id, T0, &audit(&org.id, "key.revoked", T0))
        .await;
    assert_eq!(outcome.ok(), Some(RevokeOutcome::Revoked));
    let again = store
        .revoke_key(&org.id, &k.id, T0, &audit(&org.id, "key.revoked", T0))
        .await;
    assert_eq!(again.ok(), Some(RevokeOutcome::AlreadyRevoked));
    let missing = store
        .revoke_key(
            &org.id,
            &KeyId::generate(),
            T0,
            &audit(&org.id, "key.revoked", T0),
        )
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)));

    let revoked = store
        .get_key(&org.id, &k.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(revoked.state(T0), KeyState::Revoked);
    // A revoked key can be neither updated nor rotated.
    assert!(matches!(
        store
            .update_key(&revoked, &audit(&org.id, "key.updated", T0))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let rotation = Rotation {
        new_hash: hash(8),
        new_hint: "x".into(),
        new_scopes: None,
        previous_valid_until: T0,
        now: T0,
    };
    assert!(matches!(
        store
            .rotate_key(
                &org.id,
                &k.id,
                &rotation,
                &audit(&org.id, "key.rotated", T0)
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    // The audit log has exactly one revocation.
    let log = store
        .list_audit(
            &org.id,
            &PageRequest {
                limit: 100,
                before: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        log.items
            .iter()
            .filter(|a| a.action == "key.revoked")
            .count(),
        1
    );
}

pub async fn rotation_keeps_at_most_two_live_secrets(store: Arc<dyn Store>) {
    let (org, _, k) = seeded(&store).await;
    let rotate = |h: u8, until: Timestamp, now: Timestamp, scopes: Option<Vec<String>>| Rotation {
        new_hash: hash(h),
        new_hint: format!("hint{h}"),
        new_scopes: scopes,
        previous_valid_until: until,
        now,
    };
    let t1 = T0.plus_secs(10);
    let rotated = store
        .rotate_key(
            &org.id,
            &k.id,
            &rotate(2, t1.plus_secs(100), t1, Some(vec!["management".into()])),
            &audit(&org.id, "key.rotated", t1),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rotated.hint, "hint2");
    assert_eq!(rotated.scopes, vec!["management".to_owned()]);
    assert_eq!(rotated.previous_valid_until, Some(t1.plus_secs(100)));
    let validity = |h| {
        let store = store.clone();
        async move {
            store
                .find_by_hash(&hash(h))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .map(|f| f.validity.valid_until)
        }
    };
    assert_eq!(validity(1).await, Some(Some(t1.plus_secs(100))));
    assert_eq!(validity(2).await, Some(None));

    // A second rotation inside the grace ends the oldest secret at once.
    let t2 = t1.plus_secs(5);
    store
        .rotate_key(
            &org.id,
            &k.id,
            &rotate(3, t2.plus_secs(50), t2, None),
            &audit(&org.id, "key.rotated", t2),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(validity(1).await, Some(Some(t2)));
    assert_eq!(validity(2).await, Some(Some(t2.plus_secs(50))));
    assert_eq!(validity(3).await, Some(None));
}

pub async fn listing_filters_and_paginates(store: Arc<dyn Store>) {
    let (org, project, first) = seeded(&store).await;
    let mut ids = vec![first.id];
    for i in 0..6u8 {
        let mut k = key(&org.id, &project.id);
        if i == 0 {
            k.expires_at = Some(T0);
        }
        store
            .create_key(&k, &hash(10 + i), &audit(&org.id, "key.created", T0))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if i == 1 {
            store
                .revoke_key(&org.id, &k.id, T0, &audit(&org.id, "key.revoked", T0))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        ids.push(k.id);
    }
    ids.sort();
    ids.reverse();

    let mut seen = vec![];
    let mut page = PageRequest {
        limit: 3,
        before: None,
    };
    loop {
        let p = store
            .list_keys(&org.id, &KeyFilter::default(), &page, T0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        seen.extend(p.items.into_iter().map(|k| k.id));
        match p.next_cursor {
            Some(c) => page.before = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let count = |state| {
        let store = store.clone();
        let org = org.id.clone();
        async move {
            let filter = KeyFilter {
                project_id: None,
                state: Some(state),
            };
            store
                .list_keys(
                    &org,
                    &filter,
                    &PageRequest {
                        limit: 100,
                        before: None,
                    },
                    T0,
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .items
                .len()
        }
    };
    assert_eq!(count(KeyState::Active).await, 5);
    assert_eq!(count(KeyState::Revoked).await, 1);
    assert_eq!(count(KeyState::Expired).await, 1);
    let other_project = KeyFilter {
        project_id: Some(ProjectId::generate()),
        state: None,
    };
    let none = store
        .list_keys(
            &org.id,
            &other_project,
            &PageRequest {
                limit: 100,
                before: None,
            },
            T0,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.items.is_empty());
}

pub async fn leaked_secrets_revoke_live_keys_only(store: Arc<dyn Store>) {
    let (org, project, first) = seeded(&store).await;
    let mut expired = key(&org.id, &project.id);
    expired.expires_at = Some(T0);
    store
        .create_key(&expired, &hash(20), &audit(&org.id, "key.created", T0))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let revoked = store
        .revoke_leaked(
            &[hash(1), hash(20), hash(99), hash(1)],
            T0,
            "key_reporter",
            Some("192.0.2.1"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(revoked, 1);
    let k = store
        .get_key(&org.id, &first.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.state(T0), KeyState::Revoked);
    let log = store
        .list_audit(
            &org.id,
            &PageRequest {
                limit: 100,
                before: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let entry = log.items.iter().find(|a| a.action == "key.revoked");
    assert_eq!(
        entry.and_then(|a| a.target.clone()),
        Some(first.id.to_string())
    );
    assert_eq!(
        entry.and_then(|a| a.ip.clone()),
        Some("192.0.2.1".to_owned())
    );
}

pub async fn audit_log_is_append_only_and_ordered(store: Arc<dyn Store>) {
    let (org, _, _) = seeded(&store).await;
    for i in 0..4 {
        store
            .append_audit(&audit(&org.id, &format!("test.{i}"), T0.plus_secs(i)))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let log = store
        .list_audit(
            &org.id,
            &PageRequest {
                limit: 2,
                before: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        log.items
            .iter()
            .map(|a| a.action.as_str())
            .collect::<Vec<_>>(),
        ["test.3", "test.2"]
    );
    assert!(log.next_cursor.is_some());
}

pub async fn unique_slugs_conflict(store: Arc<dyn Store>) {
    let (org, project, _) = seeded(&store).await;
    let dup = Project {
        id: ProjectId::generate(),
        ..project.clone()
    };
    let result = store
        .create_project(&dup, &audit(&org.id, "project.created", T0))
        .await;
    assert!(matches!(result, Err(StoreError::Conflict(_))));
    let by_slug = store
        .get_project(&org.id, "default")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_slug, project);
    let by_id = store
        .get_project(&org.id, project.id.as_str())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_id, project);
}

pub async fn key_changes_are_fed_in_order(store: Arc<dyn Store>) {
    let (org, _, k) = seeded(&store).await;
    let mut earlier = k.clone();
    earlier.name = "w".into();
    store
        .update_key(&earlier, &audit(&org.id, "key.updated", T0))
        .await
        .unwrap();
    let start = store.key_changes_head().await.unwrap();
    assert!(start > 0);
    // A node starting now follows from the head: the earlier change does not come back.
    let none = store.key_changes_since(start).await.unwrap();
    assert_eq!(
        none,
        KeyChanges {
            next: start,
            ..KeyChanges::default()
        }
    );
    let mut patched = k.clone();
    patched.name = "x".into();
    store
        .update_key(&patched, &audit(&org.id, "key.updated", T0))
        .await
        .unwrap();
    store
        .revoke_key(&org.id, &k.id, T0, &audit(&org.id, "key.revoked", T0))
        .await
        .unwrap();
    let changes = store.key_changes_since(start).await.unwrap();
    assert_eq!(changes.changed, vec![k.id, k.id]);
    assert!(changes.created.is_empty());
    let next = changes.next;
    assert!(next > start);
    let again = store.key_changes_since(next).await.unwrap();
    assert_eq!(
        again,
        KeyChanges {
            next,
            ..KeyChanges::default()
        }
    );
    assert_eq!(store.key_changes_head().await.unwrap(), next);
    store.prune_key_changes(T0.plus_secs(1)).await.unwrap();
}

pub async fn usage_batches_add_up(store: Arc<dyn Store>) {
    use keyward_store::{UsageCounts, UsageRow};
    let (org, _, k) = seeded(&store).await;
    let minute = Timestamp::from_millis(T0.as_millis() / 60_000 * 60_000);
    let row = |allowed, forbidden| UsageRow {
        key_id: k.id,
        minute,
        counts: UsageCounts {
            allowed,
            unauthorized: 1,
            forbidden,
            rate_limited: 0,
        },
    };
    store
        .record_usage(&[row(3, 1)], &[(k.id, T0.plus_secs(5))])
        .await
        .unwrap();
    store
        .record_usage(&[row(2, 0)], &[(k.id, T0.plus_secs(1))])
        .await
        .unwrap();
    let rows = store
        .usage(&org.id, &k.id, minute, minute.plus_secs(60))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].counts,
        UsageCounts {
            allowed: 5,
            unauthorized: 2,
            forbidden: 1,
            rate_limited: 0
        }
    );
    // last_used_at only moves forward.
    let key = store.get_key(&org.id, &k.id).await.unwrap();
    assert_eq!(key.last_used_at, Some(T0.plus_secs(5)));
    // Another org sees nothing.
    assert!(
        store
            .usage(&OrgId::generate(), &k.id, minute, minute.plus_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A flush of more rows than one statement takes (SQLite writes them in chunks), with the
/// same (key, minute) twice in one batch and two keys' last use.
pub async fn large_usage_batches_are_written_whole(store: Arc<dyn Store>) {
    use keyward_store::{UsageCounts, UsageRow};
    let (org, project, k) = seeded(&store).await;
    let other = key(&org.id, &project.id);
    store
        .create_key(&other, &hash(2), &audit(&org.id, "key.created", T0))
        .await
        .unwrap();
    let first = Timestamp::from_millis(T0.as_millis() / 60_000 * 60_000);
    const MINUTES: i64 = 2_500;
    let counts = |n: u64| UsageCounts {
        allowed: n,
        unauthorized: 0,
        forbidden: 0,
        rate_limited: 1,
    };
    let mut rows: Vec<UsageRow> = (0..MINUTES)
        .map(|m| UsageRow {
            key_id: k.id,
            minute: first.plus_secs(60 * m),
            counts: counts(u64::try_from(m).unwrap() + 1),
        })
        .collect();
    rows.push(UsageRow {
        key_id: k.id,
        minute: first,
        counts: counts(10),
    });
    rows.push(UsageRow {
        key_id: other.id,
        minute: first,
        counts: counts(7),
    });
    let last_used = [
        (k.id, T0.plus_secs(9)),
        (other.id, T0.plus_secs(3)),
        (k.id, T0.plus_secs(4)),
    ];
    store.record_usage(&rows, &last_used).await.unwrap();
    let end = first.plus_secs(60 * MINUTES);
    let written = store.usage(&org.id, &k.id, first, end).await.unwrap();
    assert_eq!(written.len(), 2_500);
    assert_eq!(
        written[0].counts,
        UsageCounts {
            allowed: 11,
            rate_limited: 2,
            ..counts(0)
        }
    );
    for (m, row) in written.iter().enumerate().skip(1) {
        assert_eq!(row.minute, first.plus_secs(60 * i64::try_from(m).unwrap()));
        assert_eq!(row.counts, counts(u64::try_from(m).unwrap() + 1));
    }
    let theirs = store.usage(&org.id, &other.id, first, end).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].counts, counts(7));
    let got = |id| {
        let store = store.clone();
        let org = org.id.clone();
        async move { store.get_key(&org, &id).await.unwrap().last_used_at }
    };
    assert_eq!(got(k.id).await, Some(T0.plus_secs(9)));
    assert_eq!(got(other.id).await, Some(T0.plus_secs(3)));
}

async fn all_hashes(store: &Arc<dyn Store>) -> Vec<KeyHash> {
    let mut all = Vec::new();
    store
        .secret_hashes(&mut |page| all.extend(page))
        .await
        .unwrap();
    all
}

pub async fn secret_hashes_are_listed_and_creations_fed(store: Arc<dyn Store>) {
    let (org, project, first) = seeded(&store).await;
    let start = store.key_changes_head().await.unwrap();
    let second = key(&org.id, &project.id);
    store
        .create_key(&second, &hash(7), &audit(&org.id, "key.created", T0))
        .await
        .unwrap();
    // A creation is in the feed, as such: a node's filter of stored hashes learns of it
    // there, and no cache drops anything for it.
    let changes = store.key_changes_since(start).await.unwrap();
    assert_eq!(changes.created, vec![second.id]);
    assert!(changes.changed.is_empty());
    let t1 = T0.plus_secs(10);
    let rotation = Rotation {
        new_hash: hash(2),
        new_hint: "hint2".into(),
        new_scopes: None,
        previous_valid_until: t1.plus_secs(100),
        now: t1,
    };
    store
        .rotate_key(
            &org.id,
            &first.id,
            &rotation,
            &audit(&org.id, "key.rotated", t1),
        )
        .await
        .unwrap();
    let sorted = |mut hashes: Vec<KeyHash>| {
        hashes.sort_by_key(|h| *h.as_bytes());
        hashes
    };
    assert_eq!(
        sorted(all_hashes(&store).await),
        sorted(vec![hash(1), hash(2), hash(7)])
    );
    assert_eq!(
        sorted(store.secret_hashes_of(&[first.id]).await.unwrap()),
        sorted(vec![hash(1), hash(2)])
    );
    assert_eq!(
        store
            .secret_hashes_of(&[second.id, KeyId::generate()])
            .await
            .unwrap(),
        vec![hash(7)]
    );
    assert!(store.secret_hashes_of(&[]).await.unwrap().is_empty());
}
