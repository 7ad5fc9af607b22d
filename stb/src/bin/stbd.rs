//! `stbd`: the set-top box daemon's command line. For now: `stbd readers` lists the card
//! readers and their cards through PC/SC, like pcsc_scan (`--watch` follows events).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use reader_drivers::ReaderDriver;
use reader_drivers::pcsc::PcscDriver;
use stb::readers_cmd;

#[derive(Parser)]
#[command(name = "stbd", version, about = "Purselink set-top box daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the card readers (PC/SC) and each one's card state and ATR.
    Readers {
        /// Keep running and print reader and card events until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
}

async fn readers(watch: bool) -> ExitCode {
    let driver = PcscDriver::new();
    let listed = match readers_cmd::list(&driver).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stbd: {e}");
            ExitCode::FAILURE
        }
    };
    if !watch {
        return listed;
    }
    let mut events = driver.events();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            ev = events.recv() => match ev {
                Some(ev) => println!("{}", readers_cmd::format_event(&ev)),
                None => break,
            },
        }
    }
    driver.shutdown();
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STBD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stbd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Readers { watch } => rt.block_on(readers(watch)),
    }
}
