//! `fleet-server`: the bundled binary. Thin: it parses config, builds the parts from the
//! crates, wires them and runs.

mod app;
mod config;

use std::process::ExitCode;

use clap::CommandFactory;
use config::{Cli, Command};

/// RFC 3339 in UTC, as the API shows times.
pub(crate) fn api_ts(t: time::OffsetDateTime) -> String {
    fleet_api::ts(t)
}

/// Parses the command line; a bad value's message names both the flag and its environment
/// variable, since either may have supplied it.
fn parse() -> Result<Cli, clap::Error> {
    use clap::FromArgMatches;
    let matches = Cli::command().try_get_matches().map_err(named)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(named)?;
    // The demo has its own defaults for what the user did not set.
    if let (Command::Demo(args), Some(("demo", m))) = (&mut cli.command, matches.subcommand()) {
        let given = |id: &str| {
            !matches!(
                m.value_source(id),
                None | Some(clap::parser::ValueSource::DefaultValue)
            )
        };
        args.health_interval_given = given("health_interval");
        args.health_timeout_given = given("health_timeout");
    }
    Ok(cli)
}

/// A bad value's message names both the flag and its environment variable.
fn named(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    {
        if !matches!(
            e.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        ) {
            return e;
        }
        let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
            return e;
        };
        let long = arg
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_start_matches("--")
            .to_owned();
        let env = find_env(&Cli::command(), &long);
        match env {
            Some(env) => {
                let mut cmd = Cli::command();
                let text = e.to_string();
                let detail = text
                    .trim_start_matches("error: ")
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                cmd.error(e.kind(), format!("{detail} (setting {env} or --{long})"))
            }
            None => e,
        }
    }
}

fn find_env(cmd: &clap::Command, long: &str) -> Option<String> {
    for a in cmd.get_arguments() {
        if a.get_long() == Some(long) {
            return a.get_env().map(|e| e.to_string_lossy().into_owned());
        }
    }
    cmd.get_subcommands().find_map(|s| find_env(s, long))
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let threads = match &cli.command {
        Command::Serve(args) => args.workers.worker_threads,
        Command::Demo(args) => args.workers.worker_threads,
        _ => 1,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(threads))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                app::init_logging(&args.log)?;
                app::serve(*args).await
            }
            Command::Demo(args) => {
                app::init_logging(&args.log)?;
                app::demo(*args).await
            }
            Command::Migrate { db } => app::migrate(db).await,
            Command::Token { command, db } => app::token(command, db).await,
            Command::Servers { command, db, keys } => app::servers(command, db, keys).await,
            Command::Keys { command, db, keys } => app::keys(command, db, keys).await,
            Command::Alerts { command, client } => app::alerts(command, client).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
