//! `vcard`: the virtual purse card from its state file, on the command line.
//!
//! - `vcard create` personalises a new card file (card id, balance, currency, expiry; keys
//!   diversified from an issuer master-key file).
//! - `vcard attach-vpcd` puts the card in vsmartcard's virtual reader, so any PC/SC
//!   application sees it in "Virtual PCD 00 00"; it re-attaches when pcscd restarts and
//!   detaches (card removed) on Ctrl-C or SIGTERM.
//! - `vcard create-psam` personalises a security card (PSAM) file with the issuer's purchase
//!   master keys; `vcard attach-vpcd --psam FILE` serves it in a reader of its own (the
//!   payment server's terminal: `[payment] security_cards = [{ kind = "pcsc", … }]`).
//! - `vcard serial-pty` runs a Phoenix or Smartmouse reader with the card on a pty (T=0 or
//!   T=1, direct or inverse convention), its modem lines on a Unix socket, so a real `stbd`
//!   can use it (`[reader] kind = "serial"`, `modem_lines = "socket:PATH"`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto::card::CardSpec;
use proto::money::Currency;
use proto::purse::{AnyMasterKeyFile, Expiry, IssuerKeyFile};
use reader_drivers::emulator::vpcd;
use reader_drivers::vcard::VirtualCard;
use reader_drivers::vpsam::VirtualPsam;

#[derive(Parser)]
#[command(name = "vcard", version, about = "The Purselink virtual purse card")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Personalise a new card and write its state file (never overwrites a card).
    Create {
        /// The card state file to create.
        #[arg(long)]
        card: PathBuf,
        /// Card id (decimal).
        #[arg(long)]
        card_id: u64,
        /// Initial balance in minor units (cents).
        #[arg(long, default_value_t = 0)]
        balance: u64,
        /// Maximum balance in minor units.
        #[arg(long, default_value_t = 100_000)]
        max_balance: u64,
        /// Loyalty points on the card's points purse (002; at most 100,000,000).
        #[arg(long, default_value_t = 0)]
        points: u64,
        /// Currency: EUR, USD, GBP, JPY, CHF, CAD, or an ISO 4217 numeric code with its
        /// exponent as CODE:EXPONENT (e.g. 978:2).
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Expiry month, YYYY-MM.
        #[arg(long)]
        expiry: String,
        /// Provider (issuer) id.
        #[arg(long, default_value_t = 1)]
        provider_id: u32,
        /// Issuer master-key file (TOML: key_version, purchase_master, load_master as hex).
        #[arg(long)]
        issuer_keys: PathBuf,
        /// A file whose first line is the cardholder PIN (4-12 digits): purchases above
        /// --pin-threshold then need it (seed 004); three wrong PINs block it.
        #[arg(long, requires = "pin_threshold")]
        pin_file: Option<PathBuf>,
        /// With --pin-file: the amount (minor units) above which a purchase needs the PIN.
        #[arg(long, requires = "pin_file")]
        pin_threshold: Option<u64>,
        /// The oldest of the card's four application-key epochs (seed 004 card to card:
        /// epochs N to N+3). Used when the issuer key file has an `app_master`.
        #[arg(long, default_value_t = 1)]
        app_epoch: u8,
    },
    /// Personalise a new security card (PSAM) and write its state file (never overwrites).
    CreatePsam {
        /// The security-card state file to create (it holds the keys: written 0600).
        #[arg(long)]
        psam: PathBuf,
        /// Security card id (decimal, or hex with 0x): the terminal id the payment server's
        /// config names.
        #[arg(long, value_parser = parse_id)]
        id: u64,
        /// The issuer's purchase master keys (the payment server's purchase-keys file: one
        /// key, or `[[keys]]` generations).
        #[arg(long)]
        purchase_keys: PathBuf,
    },
    /// Print the card's purse (balance, counters, status) and its transaction log, or a
    /// security card's id, counter, hotlist version and totals.
    Info {
        /// The card state file.
        #[arg(long, required_unless_present = "psam", conflicts_with = "psam")]
        card: Option<PathBuf>,
        /// A security-card state file instead.
        #[arg(long)]
        psam: Option<PathBuf>,
    },
    /// Attach the card (or a security card) to vsmartcard's vpcd (pcscd's "Virtual PCD"
    /// reader) until Ctrl-C.
    AttachVpcd {
        /// The card state file.
        #[arg(long, required_unless_present = "psam", conflicts_with = "psam")]
        card: Option<PathBuf>,
        /// A security-card state file instead (serve it on a vpcd port of its own).
        #[arg(long)]
        psam: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 35963 is reader "Virtual PCD 00 00", 35964 "Virtual PCD 00 01".
        #[arg(long, default_value_t = vpcd::DEFAULT_PORT)]
        port: u16,
        /// Exit with an error if vpcd cannot be reached at start, instead of retrying.
        #[arg(long)]
        no_retry: bool,
    },
    /// Emulate a Phoenix or Smartmouse reader holding the card on a pty. Prints the pty path
    /// (`pty PATH`) and the modem-line socket (`lines PATH`): ptys have no modem lines, so
    /// reset and card detect are served on that socket (stbd: `modem_lines = "socket:PATH"`).
    SerialPty {
        /// The card state file.
        #[arg(long)]
        card: PathBuf,
        /// Card clock in Hz (3571200 gives 9600 baud).
        #[arg(long, default_value_t = 3_571_200)]
        clock_hz: u32,
        /// The reader's wiring: phoenix (RTS high resets) or smartmouse (RTS low resets).
        #[arg(long, default_value = "phoenix")]
        profile: String,
        /// The card's protocol: t0 or t1.
        #[arg(long, default_value = "t0")]
        protocol: String,
        /// Inverse convention (TS = 3F).
        #[arg(long)]
        inverse: bool,
        /// TA1 the card offers (hex; Fi/Di for PPS): 18 is 115200 baud at 3.5712 MHz.
        #[arg(long, default_value = "18")]
        ta1: String,
        /// The whole ATR (hex, values), overriding the options above.
        #[arg(long)]
        atr: Option<String>,
        /// Where to serve the modem lines (default: beside the card file).
        #[arg(long)]
        lines_socket: Option<PathBuf>,
        /// Also make this symlink to the pty (a stable path for a config).
        #[arg(long)]
        link: Option<PathBuf>,
    },
}

/// The virtual card's ATR on a serial reader: historical bytes "PURSELINK1", TA1 offering a
/// speed, and for T=1 the T=1 bytes (IFSC 254, BWI 4, CWI 5, LRC) and a TCK.
fn serial_atr(protocol: &str, inverse: bool, ta1: u8) -> Result<Vec<u8>, CliError> {
    let hist = b"PURSELINK1";
    let ts = if inverse { 0x3F } else { 0x3B };
    let mut atr = match protocol {
        "t0" => vec![ts, 0x10 | hist.len() as u8, ta1],
        "t1" => vec![ts, 0x90 | hist.len() as u8, ta1, 0x81, 0x31, 0xFE, 0x45],
        other => {
            return Err(CliError::Usage(format!(
                "--protocol {other:?}: expected t0 or t1"
            )));
        }
    };
    atr.extend_from_slice(hist);
    if protocol == "t1" {
        let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
        atr.push(tck);
    }
    Ok(atr)
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Card(#[from] reader_drivers::vcard::VcardError),
    #[error("{0}")]
    Vpcd(#[from] vpcd::VpcdError),
    #[error("issuer key file {path}: {detail}")]
    Keys { path: PathBuf, detail: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn parse_currency(s: &str) -> Result<Currency, CliError> {
    let named = match s.to_ascii_uppercase().as_str() {
        "EUR" => Some(Currency::EUR),
        "USD" => Some(Currency::USD),
        "GBP" => Some(Currency::GBP),
        "JPY" => Some(Currency::JPY),
        "CHF" => Some(Currency::new(756, 2)),
        "CAD" => Some(Currency::new(124, 2)),
        _ => None,
    };
    if let Some(c) = named {
        return Ok(c);
    }
    let bad = || {
        CliError::Usage(format!(
            "--currency {s:?}: expected EUR, USD, GBP, JPY, CHF, CAD or CODE:EXPONENT like 978:2"
        ))
    };
    let (code, exp) = s.split_once(':').ok_or_else(bad)?;
    let code: u16 = code.parse().map_err(|_| bad())?;
    let exp: u8 = exp.parse().map_err(|_| bad())?;
    if code == 0 || code > 999 || exp > 4 {
        return Err(bad());
    }
    Ok(Currency::new(code, exp))
}

fn parse_expiry(s: &str) -> Result<Expiry, CliError> {
    let bad = || CliError::Usage(format!("--expiry {s:?}: expected YYYY-MM, e.g. 2030-12"));
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    let year: u16 = y.parse().map_err(|_| bad())?;
    let month: u8 = m.parse().map_err(|_| bad())?;
    if !(2000..=2099).contains(&year) || !(1..=12).contains(&month) {
        return Err(bad());
    }
    Ok(Expiry { year, month })
}

fn parse_id(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// The issuer's keys and, if the file has one, the application master.
fn read_issuer_keys(
    path: &PathBuf,
) -> Result<(proto::purse::IssuerKeys, Option<proto::crypto::DesKey>), CliError> {
    let err = |detail: String| CliError::Keys {
        path: path.clone(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: IssuerKeyFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    Ok((
        file.to_keys().map_err(err)?,
        file.app_master().map_err(err)?,
    ))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.cmd {
        Cmd::Create {
            card,
            card_id,
            balance,
            max_balance,
            points,
            currency,
            expiry,
            provider_id,
            issuer_keys,
            pin_file,
            pin_threshold,
            app_epoch,
        } => {
            if balance > max_balance {
                return Err(CliError::Usage(format!(
                    "--balance {balance} exceeds --max-balance {max_balance}"
                )));
            }
            if points > proto::card::POINTS_MAX {
                return Err(CliError::Usage(format!(
                    "--points {points} exceeds the points purse's {}",
                    proto::card::POINTS_MAX
                )));
            }
            let spec = CardSpec {
                card_id,
                provider_id,
                currency: parse_currency(&currency)?,
                balance,
                max_balance,
                expiry: parse_expiry(&expiry)?,
            };
            let (keys, app_master) = read_issuer_keys(&issuer_keys)?;
            let mut state = proto::card::CardState::personalise(&spec, &keys);
            if let Some(master) = &app_master {
                state = state
                    .with_app_keys(master, app_epoch)
                    .map_err(|e| CliError::Usage(format!("--app-epoch: {e}")))?;
            }
            state.points = points;
            if let (Some(f), Some(threshold)) = (&pin_file, pin_threshold) {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| CliError::Usage(format!("--pin-file {}: {e}", f.display())))?;
                let pin = text.lines().next().unwrap_or_default().trim();
                state = state
                    .with_pin(pin, threshold)
                    .map_err(|e| CliError::Usage(format!("--pin-file {}: {e}", f.display())))?;
            }
            VirtualCard::create_with(&card, state)?;
            println!(
                "created card {card_id} in {} (balance {balance} minor units, {currency}, expires {expiry})",
                card.display()
            );
            Ok(())
        }
        Cmd::CreatePsam {
            psam,
            id,
            purchase_keys,
        } => {
            let err = |detail: String| CliError::Keys {
                path: purchase_keys.clone(),
                detail,
            };
            let text = std::fs::read_to_string(&purchase_keys).map_err(|e| err(e.to_string()))?;
            let keys: AnyMasterKeyFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
            VirtualPsam::create(&psam, id, keys.into_generations())?;
            println!("created security card {id:#X} in {}", psam.display());
            Ok(())
        }
        Cmd::Info {
            card: None,
            psam: Some(psam),
        } => {
            let vp = VirtualPsam::open(&psam)?;
            let s = vp.psam().status();
            println!(
                "security card {:#X}: transactions {}, key version {}, hotlist version {}",
                s.security_card_id, s.txn_counter, s.newest_key_version, s.hotlist_version
            );
            for (c, t) in &s.totals {
                let money = proto::money::Money::new(t.amount, *c);
                println!("  {} sales, {money}", t.count);
            }
            let kept = &vp.psam().card().txns;
            let reversed = kept
                .values()
                .filter(|t| t.state == proto::security_card::TxnState::Reversed)
                .count();
            println!(
                "  transactions kept: {} open or not yet purged, {reversed} reversed (kept for a late proof)",
                kept.len() - reversed
            );
            Ok(())
        }
        Cmd::Info { card, .. } => {
            let card = card.ok_or_else(|| CliError::Usage("--card or --psam".into()))?;
            let vc = VirtualCard::open(&card)?;
            let s = vc.state();
            let money = |minor| proto::money::Money::new(minor, s.currency);
            println!(
                "card {} (provider {}), expires {}-{:02}",
                s.card_id, s.provider_id, s.expiry.year, s.expiry.month
            );
            println!(
                "balance {} of at most {}",
                money(s.balance),
                money(s.max_balance)
            );
            println!("points {}", s.points);
            println!(
                "transactions {} (loads {}), blocked: {}, bad signatures {} of {}",
                s.atc,
                s.load_count,
                s.status & proto::purse::STATUS_BLOCKED != 0,
                s.bad_key_count,
                s.bad_key_limit
            );
            for r in s.log.iter().rev() {
                // Each record in its own currency: money, points, or an authentication
                // (whose balance after is the money's).
                let amount = |minor| proto::money::Money::new(minor, r.currency).to_string();
                let balance_currency = if r.currency == proto::money::Currency::AUTHENTICATION {
                    s.currency
                } else {
                    r.currency
                };
                println!(
                    "  #{:<4} {:?}  {:>12}  balance after {:>12}  {}-{:02}-{:02}",
                    r.atc,
                    r.kind,
                    amount(r.amount),
                    proto::money::Money::new(r.balance_after, balance_currency).to_string(),
                    r.date.year,
                    r.date.month,
                    r.date.day
                );
            }
            Ok(())
        }
        Cmd::AttachVpcd {
            card,
            psam,
            host,
            port,
            no_retry,
        } => {
            let (app, card): (Box<dyn proto::apdu::CardApplication>, PathBuf) = match (card, psam) {
                (_, Some(p)) => (Box::new(VirtualPsam::open(&p)?), p),
                (Some(c), None) => (Box::new(VirtualCard::open(&c)?), c),
                (None, None) => return Err(CliError::Usage("--card or --psam".into())),
            };
            let shared = vpcd::shared(app);
            // The reader's name is pcscd's: the default vpcd entry's for 35963/35964; the
            // security-card entry (scripts/system-setup.sh) names 35965 "Purselink PSAM 00 00".
            let reader = match port {
                35963..=35966 => vpcd::reader_name(port),
                _ => format!("the reader pcscd's config gives vpcd port {port}"),
            };
            if no_retry {
                // Fail fast on a missing vpcd, then serve with re-attach like the default.
                let mut att = vpcd::attach(shared.clone(), &host, port).await?;
                println!(
                    "card {} attached to vpcd {host}:{port} (reader {reader:?})",
                    card.display()
                );
                tokio::select! {
                    _ = shutdown_signal() => { att.detach().await; return Ok(()); }
                    r = att.wait() => {
                        tracing::warn!(result = ?r.err().map(|e| e.to_string()), "vpcd connection ended; re-attaching");
                    }
                }
            } else {
                println!(
                    "serving card {} on vpcd {host}:{port} (reader {reader:?}); Ctrl-C detaches",
                    card.display()
                );
            }
            vpcd::serve_forever(
                shared,
                &host,
                port,
                Duration::from_secs(1),
                shutdown_signal(),
            )
            .await;
            println!("card detached");
            Ok(())
        }
        Cmd::SerialPty {
            card,
            clock_hz,
            profile,
            protocol,
            inverse,
            ta1,
            atr,
            lines_socket,
            link,
        } => {
            use reader_drivers::emulator::phoenix::{PhoenixConfig, PhoenixEmulator};
            use reader_drivers::serial::LineConfig;
            use std::io::Write;
            let wiring = match profile.as_str() {
                "phoenix" => LineConfig::PHOENIX,
                "smartmouse" => LineConfig::SMARTMOUSE,
                other => {
                    return Err(CliError::Usage(format!(
                        "--profile {other:?}: expected phoenix or smartmouse"
                    )));
                }
            };
            let atr = match atr {
                Some(h) => hex::decode(h.replace([' ', ':'], ""))
                    .map_err(|e| CliError::Usage(format!("--atr: {e}")))?,
                None => {
                    let ta1 = u8::from_str_radix(&ta1, 16)
                        .map_err(|e| CliError::Usage(format!("--ta1 {ta1:?}: {e}")))?;
                    serial_atr(&protocol, inverse, ta1)?
                }
            };
            let vc = VirtualCard::open(&card)?;
            let config = PhoenixConfig {
                clock_hz,
                atr: Some(atr.clone()),
                wiring,
                ..PhoenixConfig::default()
            };
            let mut emu = PhoenixEmulator::start(Box::new(vc), config)?;
            let socket = lines_socket.unwrap_or_else(|| card.with_extension("lines"));
            let socket = std::path::absolute(&socket).unwrap_or(socket);
            emu.serve_lines(&socket)?;
            emu.set_card_present(true);
            if let Some(link) = &link {
                let _ = std::fs::remove_file(link);
                std::os::unix::fs::symlink(emu.path(), link)?;
            }
            let mut out = std::io::stdout();
            writeln!(out, "pty {}", emu.path())?;
            writeln!(out, "lines {}", socket.display())?;
            writeln!(out, "atr {}", hex::encode_upper(&atr))?;
            out.flush()?;
            shutdown_signal().await;
            if let Some(link) = &link {
                let _ = std::fs::remove_file(link);
            }
            drop(emu);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`| head`) ends the program quietly, as
    // for any Unix tool, instead of a panic on the broken pipe.
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VCARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vcard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vcard: {e}");
            ExitCode::FAILURE
        }
    }
}
