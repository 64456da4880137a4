//! The `keyward` binary: `serve`, `migrate`, `config check`, and local management commands.

mod cli;
mod local;

use std::process::ExitCode;

use clap::Parser;

// glibc's allocator spent ~15% of the proxy path in malloc/free/consolidate (perf, bench/).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
