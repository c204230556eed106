//! `agent`: see the library crate for the data flow.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use agent::{cli, dump, run, trace};
use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level)),
        );
    match cli.log_format {
        cli::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        cli::LogFormat::Json => logs.with_ansi(false).json().init(),
    }
    let result = match cli.command {
        cli::Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(&args))),
        cli::Command::DumpRuleset(args) => dump::run(&args),
        cli::Command::Trace(args) => trace::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
