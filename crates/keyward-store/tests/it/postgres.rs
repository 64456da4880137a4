//! What only PostgreSQL needs testing for: the database itself keeps the audit log
//! append-only, and what SQLite gets from running one writer at a time still holds when nodes
//! write concurrently.

use std::sync::Arc;

use keyward_core::Timestamp;
use keyward_core::ids::{AuditId, KeyId, OrgId, ProjectId};
use keyward_core::key::ApiKey;
use keyward_core::key_format::{Environment, KeyHash};
use keyward_store::{
    AuditEntry, Bootstrap, Org, PgStore, Project, SigningKeyRecord, Store, StoreError,
};
use sqlx::{Connection, PgConnection};

use crate::pg::PgDatabase;

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

fn bootstrap() -> Bootstrap {
    let org = OrgId::generate();
    let project = ProjectId::generate();
    let key = KeyId::generate();
    Bootstrap {
        org: Org {
            id: org.clone(),
            name: "Default".into(),
            tier: "free".into(),
            default_project_id: None,
            created_at: T0,
        },
        project: Project {
            id: project.clone(),
            org_id: org.clone(),
            slug: "default".into(),
            name: "Default".into(),
            key_prefix: "kw_{env}_".into(),
            created_at: T0,
        },
        key: ApiKey {
            id: key,
            org_id: org.clone(),
            project_id: project,
            name: "management".into(),
            environment: Environment::Live,
            hint: "kw_live_…0000".into(),
            scopes: vec!["management".into()],
            expires_at: None,
            allowed_ips: vec![],
            blocked_ips: vec![],
            endpoint: None,
            quota_requests: 0,
            quota_window: 0,
            remaining: None,
            refill: None,
            credits_version: 0,
            meta: serde_json::Map::new(),
            created_at: T0,
            created_by: "system".into(),
            last_used_at: None,
            revoked_at: None,
            previous_valid_until: None,
        },
        key_hash: KeyHash::of(key.to_string().as_bytes()),
        audit: AuditEntry {
            id: AuditId::generate(),
            org_id: org,
            actor: "system".into(),
            action: "key.created".into(),
            target: Some(key.to_string()),
            ip: None,
            details: serde_json::json!({}),
            created_at: T0,
        },
    }
}

#[tokio::test]
async fn the_database_refuses_to_change_the_audit_log() {
    let (db, store) = crate::postgres().await;
    assert!(store.bootstrap(&bootstrap()).await.unwrap());
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    for statement in [
        "UPDATE audit_log SET action = 'forged'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect_err(statement);
        assert!(
            err.to_string().contains("audit_log is append-only"),
            "{statement}: {err}"
        );
    }
    let _ = conn.close().await;
    drop(store);
    db.drop().await;
}

#[tokio::test]
async fn nodes_starting_together_migrate_once_and_bootstrap_one_org() {
    let db = PgDatabase::create().await;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(Arc::new(PgStore::open(&db.url).await.unwrap()));
    }
    // Side by side on this runtime: each waits on its own connections.
    let mut started = tokio::task::JoinSet::new();
    for node in &nodes {
        let node = node.clone();
        started.spawn(async move {
            node.migrate().await.unwrap();
            node.bootstrap(&bootstrap()).await.unwrap()
        });
    }
    let created = started.join_all().await;
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let orgs: i64 = sqlx::query_scalar("SELECT count(*) FROM orgs")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(orgs, 1);
    let _ = conn.close().await;
    drop(nodes);
    db.drop().await;
}

#[tokio::test]
async fn concurrent_signing_key_rotations_leave_one_key_active() {
    let (db, store) = crate::postgres().await;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(Arc::new(PgStore::open(&db.url).await.unwrap()));
    }
    let mut rotations = tokio::task::JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        rotations.spawn(async move {
            let record = SigningKeyRecord {
                kid: format!("kid-{i}"),
                algorithm: "EdDSA".into(),
                public_key: vec![1; 32],
                private_key: vec![2; 48],
                created_at: T0.plus_secs(i64::try_from(i).unwrap()),
                retired_at: None,
            };
            node.add_signing_key(&record).await.unwrap();
        });
    }
    rotations.join_all().await;
    let keys = store.signing_keys().await.unwrap();
    assert_eq!(keys.len(), 4);
    assert_eq!(
        keys.iter().filter(|k| k.retired_at.is_none()).count(),
        1,
        "{keys:?}"
    );
    drop((nodes, store));
    db.drop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let result = PgStore::open("postgres://keyward:secret-password@127.0.0.1:1/keyward").await;
    match result {
        Err(StoreError::Unavailable(message)) => {
            assert!(!message.contains("secret-password"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn the_change_feed_misses_nothing_while_nodes_write_concurrently() {
    let db = PgDatabase::create().await;
    let nodes: Vec<Arc<PgStore>> = vec![
        Arc::new(PgStore::open(&db.url).await.unwrap()),
        Arc::new(PgStore::open(&db.url).await.unwrap()),
    ];
    nodes[0].migrate().await.unwrap();
    let b = bootstrap();
    assert!(nodes[0].bootstrap(&b).await.unwrap());
    let start = nodes[0].key_changes_head().await.unwrap();

    // Many writers on two pools, each patching its own key over and over (one key each, so
    // that row locks do not line them up)...
    const WRITERS: usize = 12;
    const PATCHES: usize = 10;
    let audit = |action: &str| AuditEntry {
        id: AuditId::generate(),
        org_id: b.org.id.clone(),
        actor: "system".into(),
        action: action.into(),
        target: None,
        ip: None,
        details: serde_json::json!({}),
        created_at: T0,
    };
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let node = nodes[w % nodes.len()].clone();
        let mut key = ApiKey {
            id: KeyId::generate(),
            ..b.key.clone()
        };
        let hash = KeyHash::of(key.id.to_string().as_bytes());
        node.create_key(&key, &hash, &audit("key.created"))
            .await
            .unwrap();
        let audits: Vec<_> = (0..PATCHES).map(|_| audit("key.updated")).collect();
        writers.spawn(async move {
            for (p, audit) in audits.iter().enumerate() {
                key.name = format!("writer {w} patch {p}");
                node.update_key(&key, audit).await.unwrap();
            }
        });
    }
    // ...while a poller follows the feed, as a node's cache does.
    let poller = nodes[1].clone();
    let follow = tokio::spawn(async move {
        let (mut seen, mut after) = (0, start);
        loop {
            let changes = poller.key_changes_since(after).await.unwrap();
            seen += changes.changed.len();
            after = changes.next;
            if seen >= WRITERS * PATCHES {
                return seen;
            }
            tokio::task::yield_now().await;
        }
    });
    writers.join_all().await;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(5), follow)
        .await
        .expect("the poller saw every change (none skipped)")
        .unwrap();
    assert_eq!(seen, WRITERS * PATCHES);
    drop(nodes);
    db.drop().await;
}
