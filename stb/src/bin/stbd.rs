//! `stbd`: the set-top box daemon's command line. `stbd run --config FILE` runs the daemon;
//! `stbd readers` lists the card readers and their cards through PC/SC, like pcsc_scan
//! (`--watch` follows events), and serial readers (the config's, and each `--serial DEVICE`)
//! with the ATR a reset gives.

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
    /// Run the daemon: watch the reader, keep the head-end connection, show the TV UI.
    Run {
        /// The configuration file (see config/stbd.example.toml).
        #[arg(long, default_value = "/etc/stbd/stbd.toml")]
        config: std::path::PathBuf,
    },
    /// List the card readers (PC/SC, and serial ones) and each one's card state and ATR.
    Readers {
        /// Keep running and print reader and card events until Ctrl-C (PC/SC).
        #[arg(long)]
        watch: bool,
        /// Also list the serial reader this config names (default: /etc/stbd/stbd.toml when
        /// it exists).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// A serial device to probe (resets the card in it), with --profile's wiring.
        #[arg(long)]
        serial: Vec<String>,
        /// Wiring of the --serial devices: phoenix or smartmouse.
        #[arg(long, default_value = "phoenix")]
        profile: String,
        /// Modem lines of the --serial devices: "port" or "socket:PATH".
        #[arg(long, default_value = "port")]
        modem_lines: String,
    },
}

/// The serial readers to probe: the config's, then each `--serial`.
fn serial_readers(
    config: Option<std::path::PathBuf>,
    serial: &[String],
    profile: &str,
    modem_lines: &str,
) -> Result<Vec<reader_drivers::serial::SerialConfig>, String> {
    use reader_drivers::serial::{Profile, SerialConfig};
    let mut out = Vec::new();
    let default = std::path::PathBuf::from("/etc/stbd/stbd.toml");
    let path = config.or_else(|| default.exists().then_some(default));
    if let Some(path) = path {
        let cfg = stb::config::Config::load(&path).map_err(|e| e.to_string())?;
        if matches!(cfg.reader, stb::config::ReaderConfig::Serial { .. }) {
            out.push(stb::daemon::card::serial_config(&cfg.reader)?);
        }
    }
    let profile = match profile {
        "phoenix" => Profile::Phoenix,
        "smartmouse" => Profile::Smartmouse,
        p => return Err(format!("--profile {p:?}: expected phoenix or smartmouse")),
    };
    for device in serial {
        let mut c = SerialConfig::with_profile("serial", device.clone(), profile);
        c.modem_lines = stb::config::parse_modem_lines(modem_lines).map_err(|e| e.to_string())?;
        out.push(c);
    }
    Ok(out)
}

async fn readers(
    watch: bool,
    config: Option<std::path::PathBuf>,
    serial: Vec<String>,
    profile: String,
    modem_lines: String,
) -> ExitCode {
    let serials = match serial_readers(config, &serial, &profile, &modem_lines) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stbd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let driver = PcscDriver::new();
    let mut shown = 0;
    let mut listed = match readers_cmd::list(&driver).await {
        Ok(text) => {
            shown = text.matches("Reader ").count();
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) if !serials.is_empty() => {
            println!("PC/SC: {e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stbd: {e}");
            ExitCode::FAILURE
        }
    };
    for c in serials {
        let (device, wiring) = (c.path.clone(), c.lines.describe());
        let info = reader_drivers::serial::SerialDriver::new(c)
            .card_info()
            .await;
        if matches!(&info, Err(reader_drivers::ReaderError::Io { .. })) {
            listed = ExitCode::FAILURE;
        }
        print!(
            "{}",
            readers_cmd::format_serial(shown, &device, &wiring, &info)
        );
        shown += 1;
    }
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

async fn run(path: std::path::PathBuf) -> ExitCode {
    let cfg = match stb::config::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stbd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (driver, pattern) = match stb::daemon::card::driver_for(&cfg.reader) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("stbd: reader: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keys = if cfg.ui.enabled {
        // Validated at load time.
        let keymap = ui::keymap::Keymap::from_config(&cfg.keymap).unwrap_or_default();
        Some(ui::terminal::spawn_key_reader(keymap))
    } else {
        None
    };
    let local = if cfg.local_api.enabled {
        let mode = cfg.local_api.mode_bits().unwrap_or(0o660);
        match stb::local_api::server::LocalApi::bind(
            &cfg.local_api.socket,
            mode,
            cfg.local_api.group.as_deref(),
            &cfg.local_api.allowed_uids,
        ) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("stbd: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let io = stb::daemon::Io {
        driver,
        reader_pattern: pattern,
        draw: cfg.ui.enabled,
        keys,
    };
    let r = stb::daemon::run(cfg, io, stb::daemon::shutdown_signal(), |h| {
        if let Some(l) = local {
            tokio::spawn(l.serve(h.events.clone()));
        }
    })
    .await;
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stbd failed");
            eprintln!("stbd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    transport::logging::init(
        tracing_subscriber::EnvFilter::try_from_env("STBD_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    );
    let cli = Cli::parse();
    // One thread: a box has one viewer and one card; fewer threads, fewer idle wakeups.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stbd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Readers {
            watch,
            config,
            serial,
            profile,
            modem_lines,
        } => rt.block_on(readers(watch, config, serial, profile, modem_lines)),
        Cmd::Run { config } => rt.block_on(run(config)),
    }
}
