//! Console users: created from the CLI now, logging in with the console later.

use argon2::Argon2;
use argon2::password_hash::PasswordHasher;
use keyward_core::ErrorCode;
use keyward_core::ids::{AuditId, UserId};
use keyward_store::{AuditEntry, Role, StoreError, User};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::lifecycle::Actor;
use crate::state::AppState;

pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_BYTES: usize = 1024;

fn validate_email(email: &str) -> ApiResult<String> {
    let email = email.trim();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if !valid {
        return Err(ApiError::validation(
            "email",
            "`email` is not a valid address.",
        ));
    }
    Ok(email.to_owned())
}

/// argon2id with the crate's default (OWASP-recommended) parameters.
pub fn hash_password(password: &SecretString) -> ApiResult<String> {
    let password = password.expose_secret();
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::validation(
            "password",
            format!("A password has at least {MIN_PASSWORD_CHARS} characters."),
        ));
    }
    let mut salt = [0u8; 16];
    keyward_core::key_format::fill_random(&mut salt).map_err(ApiError::internal)?;
    let hash: argon2::password_hash::phc::PasswordHash = Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(ApiError::internal)?;
    Ok(hash.to_string())
}

pub async fn create_user(
    state: &AppState,
    actor: &Actor,
    email: &str,
    password: &SecretString,
    role: Role,
) -> ApiResult<User> {
    let now = state.clock.now();
    let user = User {
        id: UserId::generate(),
        email: validate_email(email)?,
        password_hash: Some(hash_password(password)?),
        created_at: now,
    };
    let audit = AuditEntry {
        id: AuditId::generate(),
        org_id: actor.org_id.clone(),
        actor: actor.id.clone(),
        action: "user.created".into(),
        target: Some(user.id.to_string()),
        ip: actor.ip.map(|ip| ip.to_string()),
        details: json!({"email": user.email, "role": role.as_str()}),
        created_at: now,
    };
    match state
        .store
        .create_user(&user, Some((&actor.org_id, role)), &audit)
        .await
    {
        Err(StoreError::Conflict(_)) => Err(ApiError::new(ErrorCode::AlreadyExists)
            .with_param("email")
            .with_message("A user with this email already exists.")),
        other => other.map_err(ApiError::from),
    }?;
    Ok(user)
}
