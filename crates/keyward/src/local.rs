//! Management commands run directly on the configured store, through the same lifecycle code
//! as the management API.

use std::io::{BufRead, IsTerminal};
use std::sync::Arc;

use keyward_core::SystemClock;
use keyward_core::ids::KeyId;
use keyward_core::key::{ApiKey, KeyState};
use keyward_core::key::{NamedInterval, Refill, RefillInterval};
use keyward_server::api::views::{KeyView, ListView, OrgView, ProjectView};
use keyward_server::bootstrap;
use keyward_server::config::Config;
use keyward_server::lifecycle::{
    self, Actor, CreateKeyInput, CreateProjectInput, RotateKeyInput, UpdateKeyInput,
};
use keyward_server::serve::BoxError;
use keyward_server::state::AppState;
use keyward_server::users;
use keyward_store::{KeyFilter, PageRequest, RevokeOutcome, Role};
use secrecy::{ExposeSecret, SecretString};

use crate::cli::{Command, JwtCommand, KeysCommand, OrgsCommand, ProjectsCommand, UsersCommand};
use keyward_server::master_key::MasterKey;

pub fn run(config: Config, command: Command) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = keyward_store::open(&config.store_url).await?;
        store.migrate().await?;
        if let Command::Migrate = command {
            println!("migrations applied");
            return Ok(());
        }
        let state = AppState::new(config, store, Arc::new(SystemClock));
        if let Some((key, secret)) = bootstrap::ensure_bootstrapped(&state).await? {
            eprintln!(
                "keyward: the store was empty — created the default organisation and project, and a management key ({}), shown only this once:\n{}",
                key.id,
                secret.expose_secret()
            );
        }
        let org = state
            .store
            .first_org()
            .await?
            .ok_or("the store has no organisation")?;
        let actor = Actor {
            id: "cli".into(),
            org_id: org.id,
            ip: None,
        };
        match command {
            Command::Keys(cmd) => keys(&state, &actor, cmd).await,
            Command::Projects(cmd) => projects(&state, &actor, cmd).await,
            Command::Users(cmd) => users_cmd(&state, &actor, cmd).await,
            Command::Orgs(cmd) => orgs(&state, &actor, cmd).await,
            Command::Jwt(JwtCommand::RotateSigningKey) => {
                let master = MasterKey::load(&state.config.server.data_dir)?;
                let kid = keyward_server::tokens::rotate_signing_key(&*state.store, &master, state.clock.now()).await?;
                println!("now signing with {kid}; the previous key stays published until its tokens expire");
                Ok(())
            }
            Command::Serve | Command::Migrate | Command::Config(_) => Ok(()),
        }
    })
}

fn print_json(value: &impl serde::Serialize) -> Result<(), BoxError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_key(key: &ApiKey, now: keyward_core::Timestamp) {
    println!("id          {}", key.id);
    println!("name        {}", key.name);
    println!("project     {}", key.project_id);
    println!("state       {}", key.state(now).as_str());
    println!("hint        {}", key.hint);
    println!("scopes      {}", key.scopes.join(","));
    if let Some(at) = key.expires_at {
        println!("expires_at  {at}");
    }
    if let Some(until) = key.pending_grace(now) {
        println!("old secret valid until {until}");
    }
}

fn print_secret(
    key: &ApiKey,
    secret: &SecretString,
    json: bool,
    now: keyward_core::Timestamp,
) -> Result<(), BoxError> {
    if json {
        let mut view = KeyView::new(key, now);
        view.key = Some(secret.expose_secret());
        return print_json(&view);
    }
    print_key(key, now);
    println!(
        "\nThe secret, shown only this once:\n{}",
        secret.expose_secret()
    );
    Ok(())
}

async fn keys(state: &AppState, actor: &Actor, cmd: KeysCommand) -> Result<(), BoxError> {
    let now = state.clock.now();
    match cmd {
        KeysCommand::Create(args) => {
            let input = CreateKeyInput {
                project: args.project,
                name: args.name,
                environment: args.environment,
                scopes: args.scopes,
                expires_at: args.expires_at,
                allowed_ips: args.allowed_ips,
                blocked_ips: args.blocked_ips,
                endpoint: args.endpoint,
                quota_requests: args.quota_requests,
                quota_window: args.quota_window,
                remaining: args.remaining,
                refill: refill(args.refill_interval.as_deref(), args.refill_amount)?,
                meta: None,
            };
            let (key, secret) = lifecycle::create_key(state, actor, input).await?;
            print_secret(&key, &secret, args.output.json, now)
        }
        KeysCommand::List {
            project,
            state: key_state,
            limit,
            output,
        } => {
            let project_id = match project {
                Some(p) => Some(state.store.get_project(&actor.org_id, &p).await?.id),
                None => None,
            };
            let key_state = key_state
                .map(|s| KeyState::parse(&s).ok_or("--state is active, revoked or expired"))
                .transpose()?;
            let filter = KeyFilter {
                project_id,
                state: key_state,
            };
            let page = PageRequest {
                limit: limit.clamp(1, 1000),
                before: None,
            };
            let keys = state
                .store
                .list_keys(&actor.org_id, &filter, &page, now)
                .await?;
            if output.json {
                return print_json(&ListView::from_page(&keys, |k| KeyView::new(k, now)));
            }
            println!(
                "{:<31} {:<8} {:<20} {:<24} NAME",
                "ID", "STATE", "HINT", "LAST USED"
            );
            for k in &keys.items {
                let last = k
                    .last_used_at
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "never".into());
                println!(
                    "{:<31} {:<8} {:<20} {:<24} {}",
                    k.id,
                    k.state(now).as_str(),
                    k.hint,
                    last,
                    k.name
                );
            }
            Ok(())
        }
        KeysCommand::Show { id, output } => {
            let key = lifecycle::get_key(state, &actor.org_id, &id).await?;
            if output.json {
                return print_json(&KeyView::new(&key, now));
            }
            print_key(&key, now);
            Ok(())
        }
        KeysCommand::Rotate {
            id,
            grace_seconds,
            scopes,
            output,
        } => {
            let input = RotateKeyInput {
                grace_seconds,
                scopes,
            };
            let (key, secret) = lifecycle::rotate_key(state, actor, &id, input).await?;
            print_secret(&key, &secret, output.json, now)
        }
        KeysCommand::Update(args) => {
            let (id, json) = (args.id.clone(), args.output.json);
            let input = update_input(args)?;
            let key = lifecycle::update_key(state, actor, &id, input).await?;
            if json {
                return print_json(&KeyView::new(&key, now));
            }
            print_key(&key, now);
            Ok(())
        }
        KeysCommand::Revoke { id, output } => {
            let outcome = lifecycle::revoke_key(state, actor, &id).await?;
            let id = KeyId::parse(&id).ok_or("invalid key id")?;
            if output.json {
                let key = state.store.get_key(&actor.org_id, &id).await?;
                return print_json(&KeyView::new(&key, now));
            }
            match outcome {
                RevokeOutcome::Revoked => println!("revoked {id}"),
                RevokeOutcome::AlreadyRevoked => println!("{id} was already revoked"),
            }
            Ok(())
        }
    }
}

async fn projects(state: &AppState, actor: &Actor, cmd: ProjectsCommand) -> Result<(), BoxError> {
    match cmd {
        ProjectsCommand::Create {
            slug,
            name,
            key_prefix,
            output,
        } => {
            let input = CreateProjectInput {
                slug,
                name,
                key_prefix,
            };
            let project = lifecycle::create_project(state, actor, input).await?;
            if output.json {
                return print_json(&ProjectView::new(&project));
            }
            println!(
                "created project {} ({}), key prefix {}",
                project.slug, project.id, project.key_prefix
            );
            Ok(())
        }
        ProjectsCommand::List { limit, output } => {
            let page = PageRequest {
                limit: limit.clamp(1, 1000),
                before: None,
            };
            let projects = state.store.list_projects(&actor.org_id, &page).await?;
            if output.json {
                return print_json(&ListView::from_page(&projects, ProjectView::new));
            }
            println!("{:<32} {:<24} {:<20} NAME", "ID", "SLUG", "KEY PREFIX");
            for p in &projects.items {
                println!(
                    "{:<32} {:<24} {:<20} {}",
                    p.id, p.slug, p.key_prefix, p.name
                );
            }
            Ok(())
        }
    }
}

/// `--refill-interval` and `--refill-amount` as the API's refill object.
fn refill(interval: Option<&str>, amount: Option<i64>) -> Result<Option<Refill>, BoxError> {
    let interval = match interval {
        None => {
            if amount.is_some() {
                return Err("--refill-amount needs --refill-interval".into());
            }
            return Ok(None);
        }
        Some("daily") => RefillInterval::Named(NamedInterval::Daily),
        Some("monthly") => RefillInterval::Named(NamedInterval::Monthly),
        Some(secs) => RefillInterval::Seconds(
            secs.parse()
                .map_err(|_| "--refill-interval is daily, monthly or a number of seconds")?,
        ),
    };
    let amount = amount.ok_or("--refill-interval needs --refill-amount")?;
    Ok(Some(Refill { interval, amount }))
}

/// `none` clears a nullable field.
fn nullable<T>(
    raw: Option<String>,
    parse: impl Fn(String) -> Result<T, BoxError>,
) -> Result<Option<Option<T>>, BoxError> {
    match raw {
        None => Ok(None),
        Some(v) if v == "none" => Ok(Some(None)),
        Some(v) => parse(v).map(|t| Some(Some(t))),
    }
}

fn update_input(args: crate::cli::UpdateKeyArgs) -> Result<UpdateKeyInput, BoxError> {
    let refill = match args.refill_interval.as_deref() {
        Some("none") => Some(None),
        Some(_) => Some(refill(args.refill_interval.as_deref(), args.refill_amount)?),
        None if args.refill_amount.is_some() => {
            return Err("--refill-amount needs --refill-interval".into());
        }
        None => None,
    };
    Ok(UpdateKeyInput {
        name: args.name,
        expires_at: nullable(args.expires_at, Ok)?,
        allowed_ips: args.allowed_ips,
        blocked_ips: args.blocked_ips,
        endpoint: nullable(args.endpoint, Ok)?,
        quota_requests: args.quota_requests,
        quota_window: args.quota_window,
        remaining: nullable(args.remaining, |v| {
            v.parse()
                .map_err(|_| "--remaining is a number or none".into())
        })?,
        refill,
        meta: args
            .meta
            .map(|m| serde_json::from_str(&m).map_err(|_| "--meta is a JSON object"))
            .transpose()?,
        scopes: None,
    })
}

async fn orgs(state: &AppState, actor: &Actor, cmd: OrgsCommand) -> Result<(), BoxError> {
    let output = match &cmd {
        OrgsCommand::Show { output } | OrgsCommand::SetTier { output, .. } => output.json,
    };
    if let OrgsCommand::SetTier { tier, .. } = &cmd {
        lifecycle::set_org_tier(state, actor, tier).await?;
    }
    let org = state.store.get_org(&actor.org_id).await?;
    if output {
        return print_json(&OrgView::new(&org));
    }
    println!(
        "id     {}\nname   {}\ntier   {}",
        org.id, org.name, org.tier
    );
    Ok(())
}

fn read_password(from_stdin: bool) -> Result<SecretString, BoxError> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        return Ok(SecretString::from(password));
    }
    let first = rpassword::prompt_password("Password: ")?;
    let second = rpassword::prompt_password("Repeat password: ")?;
    if first != second {
        return Err("the passwords differ".into());
    }
    Ok(SecretString::from(first))
}

async fn users_cmd(state: &AppState, actor: &Actor, cmd: UsersCommand) -> Result<(), BoxError> {
    match cmd {
        UsersCommand::Create {
            email,
            role,
            password_stdin,
            output,
        } => {
            let role = Role::parse(&role).ok_or("--role is owner, admin or member")?;
            let password = read_password(password_stdin)?;
            let user = users::create_user(state, actor, &email, &password, role).await?;
            if output.json {
                return print_json(&serde_json::json!({
                    "id": user.id, "object": "user", "email": user.email,
                    "role": role.as_str(), "created_at": user.created_at.to_rfc3339(),
                }));
            }
            println!(
                "created user {} ({}) as {}",
                user.email,
                user.id,
                role.as_str()
            );
            Ok(())
        }
    }
}
