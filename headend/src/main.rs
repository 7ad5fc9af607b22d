//! The `headend` binary: parses the command line and runs the subcommand.

use std::process::ExitCode;

use clap::Parser;
use headend::cli::{Cli, Command, PkiCommand};
use headend::pki::{OperatorCa, PkiError};

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // No colour codes in the journal.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn pki(cmd: PkiCommand) -> Result<(), PkiError> {
    match cmd {
        PkiCommand::InitCa { out, force } => {
            if out.join("ca.key.pem").exists() && !force {
                return Err(PkiError::Io {
                    path: out.join("ca.key.pem"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a CA already exists here (--force replaces it)",
                    ),
                });
            }
            let files = OperatorCa::generate()?.save(&out)?;
            tracing::info!(cert = %files.cert.display(), key = %files.key.display(), "operator CA created");
        }
        PkiCommand::IssueDevice { ca, box_id, out } => {
            let files = OperatorCa::load(&ca)?
                .issue_device(&box_id)?
                .save(&out, box_id.as_str())?;
            tracing::info!(%box_id, cert = %files.cert.display(), key = %files.key.display(), "device certificate issued");
        }
        PkiCommand::IssueServer { ca, names, out } => {
            let cert = OperatorCa::load(&ca)?.issue_server(&names)?;
            // The first name becomes the file name; keep it a plain file name.
            let stem = names[0].replace(['/', ':'], "_");
            let files = cert.save(&out, &stem)?;
            tracing::info!(names = ?names, cert = %files.cert.display(), key = %files.key.display(), "server certificate issued");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    let result = match cli.command {
        Command::Pki(cmd) => pki(cmd).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "headend failed");
            eprintln!("headend: {e}");
            ExitCode::FAILURE
        }
    }
}
