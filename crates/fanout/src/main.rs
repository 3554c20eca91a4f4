//! `fanout`: the realtime fan-out server. One binary, one subcommand per
//! role; with no subcommand it runs `standalone`.
//!
//! `main` parses the command line, loads the configuration for the role,
//! sets up tracing and the runtime, and hands over to the role
//! ([`roles`]).

mod config;
mod process;
mod recorder;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{Config, ConfigErrors, Flags, Sources};
use crate::roles::Role;

/// jemalloc keeps memory per connection low: large buffers sit on their own
/// pages, so their untouched parts are never resident, and its size classes
/// waste less than glibc's on the many small per-connection objects.
/// (`--no-default-features` builds with the system allocator instead, for
/// heap profilers that hook malloc, such as heaptrack.)
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: bad command line or configuration.
const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "fanout",
    version,
    about = "Self-hosted realtime pub/sub fan-out, compatible with Supabase Realtime clients",
    long_about = "fanout serves the Supabase Realtime protocol (Phoenix Channels, vsn 1.0.0 and 2.0.0) \
so an unmodified @supabase/realtime-js client can broadcast, track presence and resume after reconnects.\n\n\
Settings come from defaults, then the TOML file (--config / FANOUT_CONFIG), then FANOUT_* environment \
variables, then flags. Every flag below names its environment variable.",
    after_help = "With no subcommand, fanout runs `standalone`: everything in one process, in memory."
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// TOML config file [env: FANOUT_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    // One flag per setting, built from the settings table.
    #[command(flatten)]
    flags: Flags,
}

fn load_config(cli: &Cli, role: Role) -> Result<Config, ConfigErrors> {
    let env = |k: &str| std::env::var(k).ok();
    let path = cli.config.clone().or_else(|| env("FANOUT_CONFIG").map(Into::into));
    let file = match path {
        Some(p) => Sources::read_file(&p)?,
        None => toml::Table::new(),
    };
    Config::load(
        &Sources {
            file,
            env: &env,
            flags: cli.flags.0.clone(),
        },
        role,
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = cli.role.unwrap_or(Role::Standalone);
    let config = match load_config(&cli, role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fanout: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fanout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(role.run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn setting_flags_work_before_and_after_the_role() {
        let cli = Cli::try_parse_from(["fanout", "--listen", "127.0.0.1:1", "cdc", "--nats-url", "nats://x"]).unwrap();
        assert_eq!(cli.role, Some(Role::Cdc));
        assert_eq!(cli.flags.0.get("listen").map(String::as_str), Some("127.0.0.1:1"));
        assert_eq!(cli.flags.0.get("nats-url").map(String::as_str), Some("nats://x"));
        let cli = Cli::try_parse_from(["fanout", "--config", "f.toml"]).unwrap();
        assert_eq!((cli.role, cli.config), (None, Some(PathBuf::from("f.toml"))));
        assert!(cli.flags.0.is_empty());
    }
}
