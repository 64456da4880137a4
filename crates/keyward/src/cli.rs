use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyward_server::config::{self, Config, LogFormat};
use keyward_server::serve::BoxError;
use tracing_subscriber::EnvFilter;

use crate::local;

/// keyward: API-key authentication gateway and key-management service.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
pub struct Cli {
    /// Configuration file (default: ./keyward.toml when it exists). Every key can also be set
    /// as KEYWARD_<SECTION>__<KEY>, which wins over the file.
    #[arg(long, global = true, env = "KEYWARD_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway and the management API.
    Serve,
    /// Apply pending database migrations.
    Migrate,
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage API keys (locally, on the configured store).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage projects.
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// Manage console users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Manage the organisation.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Manage the keys that sign keyward's JWTs.
    #[command(subcommand)]
    Jwt(JwtCommand),
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Start signing with a new Ed25519 key. The old one stays in the JWKS until every token
    /// it signed has expired; running servers switch within 10 seconds.
    RotateSigningKey,
}

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Show the organisation.
    Show {
        #[command(flatten)]
        output: Output,
    },
    /// Set the organisation's tier (its per-minute and per-hour limits come from config).
    SetTier {
        tier: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration; report every invalid key and exit non-zero if any.
    Check,
}

#[derive(Debug, Args)]
pub struct Output {
    /// Print JSON (the management API's shapes) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create(CreateKeyArgs),
    /// List keys, newest first.
    List {
        /// Project id or slug.
        #[arg(long)]
        project: Option<String>,
        /// active, revoked or expired.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        output: Output,
    },
    /// Show one key.
    Show {
        id: String,
        #[command(flatten)]
        output: Output,
    },
    /// Issue a new secret; the old one works until the grace period ends.
    Rotate {
        id: String,
        /// Seconds the old secret keeps working (0..604800).
        #[arg(long)]
        grace_seconds: Option<i64>,
        /// New scope list (comma-separated).
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        #[command(flatten)]
        output: Output,
    },
    /// Change a key: name, credits, quota, expiry, IP rules, endpoint, meta.
    Update(UpdateKeyArgs),
    /// Revoke a key, permanently.
    Revoke {
        id: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct CreateKeyArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// Project id or slug (default: the organisation's default project).
    #[arg(long)]
    pub project: Option<String>,
    /// live or test.
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Comma-separated scopes.
    #[arg(long, value_delimiter = ',')]
    pub scopes: Option<Vec<String>>,
    /// RFC 3339 expiry, e.g. 2027-01-31T00:00:00Z.
    #[arg(long)]
    pub expires_at: Option<String>,
    #[arg(long, value_delimiter = ',')]
    pub allowed_ips: Option<Vec<String>>,
    #[arg(long, value_delimiter = ',')]
    pub blocked_ips: Option<Vec<String>>,
    /// Restrict the key to one route.
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long)]
    pub quota_requests: Option<u32>,
    #[arg(long)]
    pub quota_window: Option<u32>,
    /// Credits.
    #[arg(long)]
    pub remaining: Option<i64>,
    /// Refill interval: daily, monthly, or a number of seconds (needs --remaining).
    #[arg(long)]
    pub refill_interval: Option<String>,
    /// Credits each refill sets.
    #[arg(long)]
    pub refill_amount: Option<i64>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct UpdateKeyArgs {
    pub id: String,
    #[arg(long)]
    pub name: Option<String>,
    /// Credits left; `none` removes the credit limit.
    #[arg(long)]
    pub remaining: Option<String>,
    /// Refill interval: daily, monthly, or a number of seconds; `none` removes the refill.
    #[arg(long)]
    pub refill_interval: Option<String>,
    /// Credits each refill sets.
    #[arg(long)]
    pub refill_amount: Option<i64>,
    #[arg(long)]
    pub quota_requests: Option<u32>,
    #[arg(long)]
    pub quota_window: Option<u32>,
    /// RFC 3339 expiry; `none` removes it.
    #[arg(long)]
    pub expires_at: Option<String>,
    #[arg(long, value_delimiter = ',')]
    pub allowed_ips: Option<Vec<String>>,
    #[arg(long, value_delimiter = ',')]
    pub blocked_ips: Option<Vec<String>>,
    /// A route name; `none` lifts the restriction.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// A JSON object.
    #[arg(long)]
    pub meta: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    Create {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        name: Option<String>,
        /// Prefix template for the project's keys, e.g. `xero_{project}_`.
        #[arg(long)]
        key_prefix: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user in the organisation; the password comes from a prompt or stdin.
    Create {
        #[arg(long)]
        email: String,
        /// owner, admin or member.
        #[arg(long, default_value = "member")]
        role: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        output: Output,
    },
}

fn init_logging(config: &Config, to_stderr: bool) {
    let filter = EnvFilter::try_from_env("KEYWARD_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = if to_stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let result = match (config.log.format, to_stderr) {
        (LogFormat::Json, false) => builder.json().with_writer(std::io::stdout).try_init(),
        (LogFormat::Json, true) => builder.json().with_writer(std::io::stderr).try_init(),
        (LogFormat::Text, false) => builder.with_writer(std::io::stdout).try_init(),
        (LogFormat::Text, true) => builder.with_writer(std::io::stderr).try_init(),
    };
    // A subscriber already set (tests) is fine.
    drop(result);
}

pub fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    if let Command::Config(ConfigCommand::Check) = cli.command {
        return Ok(config_check(cli.config.as_deref()));
    }
    let config = config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            // Logs go to stdout; stderr carries only the one-time bootstrap secret.
            init_logging(&config, false);
            keyward_server::serve::run(config)?;
        }
        command => {
            init_logging(&config, true);
            local::run(config, command)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn config_check(file: Option<&std::path::Path>) -> ExitCode {
    match config::load(file) {
        Ok(c) => {
            println!("configuration is valid");
            println!("  server.listen          {}", c.server.listen);
            println!("  server.internal_listen {}", c.server.internal_listen);
            println!("  store.url              {}", redact_url(&c.store_url));
            println!("  ratelimit.backend      {:?}", c.ratelimit.backend);
            println!("  routes                 {}", c.routes.len());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::FAILURE
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://kw:pw@db/kw"),
            "postgres://kw:***@db/kw"
        );
        assert_eq!(redact_url("sqlite://a/b.db"), "sqlite://a/b.db");
    }
}
