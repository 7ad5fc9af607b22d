//! The `headend` binary: parses the command line and runs the subcommand.

use std::process::ExitCode;

use clap::Parser;
use headend::assembly::{self, Roles};
use headend::cli::{Cli, Command, PkiCommand, RoleArgs};
use headend::config::HeadendConfig;
use headend::pki::{OperatorCa, PkiError};

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    headend::quic::logging::init(filter);
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
        PkiCommand::IssueRole {
            ca,
            role,
            names,
            client,
            out,
        } => {
            let cert = OperatorCa::load(&ca)?.issue_role(&role, &names, client)?;
            let files = cert.save(&out, &role)?;
            tracing::info!(role, names = ?names, client, cert = %files.cert.display(), key = %files.key.display(), "role certificate issued");
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

/// Runs roles until SIGTERM or ctrl-c, telling systemd when ready and feeding its watchdog.
async fn run_roles(args: RoleArgs, roles: Roles) -> Result<(), String> {
    let cfg = HeadendConfig::load(&args.config).map_err(|e| e.to_string())?;
    // A role asked for by name needs its section (all-in-one runs what is there).
    let only_load_side = !(roles.gateway || roles.payment || roles.merchant);
    if only_load_side && roles.bank && cfg.bank.is_none() {
        return Err(format!("{}: no [bank] section", args.config.display()));
    }
    if only_load_side && roles.load && cfg.load.is_none() {
        return Err(format!("{}: no [load] section", args.config.display()));
    }
    let running = assembly::start(&cfg, roles)
        .await
        .map_err(|e| e.to_string())?;
    let watchdog = headend::notify::ready_and_watchdog();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    if let Some(n) = headend::notify::Notifier::from_env() {
        let _ = n.stopping();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    running.stop().await;
    Ok(())
}

fn payment_only(
    args: &RoleArgs,
) -> Result<std::sync::Arc<headend::payment::PaymentServer>, String> {
    let cfg = HeadendConfig::load(&args.config).map_err(|e| e.to_string())?;
    headend::payment::PaymentServer::open_offline(&cfg)
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`| head`) ends the program quietly, as
    // for any Unix tool, instead of a panic on the broken pipe.
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_tracing(&cli.log);
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    };
    let only = |gateway, payment, merchant| Roles {
        gateway,
        payment,
        merchant,
        ..Roles::NONE
    };
    let result = match cli.command {
        Command::Pki(cmd) => pki(cmd).map_err(|e| e.to_string()),
        Command::Hotlist(cmd) => hotlist(cmd),
        Command::Hsm(headend::cli::HsmCommand::Import { role, keys }) => {
            HeadendConfig::load(&role.config)
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    let def = cfg
                        .load
                        .as_ref()
                        .and_then(|l| l.token.clone())
                        .ok_or("the config has no [load] token to import into")?;
                    let text = std::fs::read_to_string(&keys)
                        .map_err(|e| format!("{}: {e}", keys.display()))?;
                    let file: proto::purse::AnyMasterKeyFile = toml::from_str(&text)
                        .map_err(|e| format!("{}: {e}", keys.display()))?;
                    headend::load::token::import(&def, &file.into_generations())
                })
                .map(|v| println!("imported load master versions {v:?} into the token"))
        }
        Command::AllInOne(a) => rt().and_then(|rt| rt.block_on(run_roles(a, Roles::ALL))),
        Command::Gateway(a) => {
            rt().and_then(|rt| rt.block_on(run_roles(a, only(true, false, false))))
        }
        Command::Payment(a) => {
            rt().and_then(|rt| rt.block_on(run_roles(a, only(false, true, false))))
        }
        Command::Merchant(a) => {
            rt().and_then(|rt| rt.block_on(run_roles(a, only(false, false, true))))
        }
        Command::Bank(a) => rt().and_then(|rt| {
            rt.block_on(run_roles(
                a,
                Roles {
                    bank: true,
                    ..Roles::NONE
                },
            ))
        }),
        Command::Load(a) => rt().and_then(|rt| {
            rt.block_on(run_roles(
                a,
                Roles {
                    load: true,
                    ..Roles::NONE
                },
            ))
        }),
        Command::BankUnlock { role, account } => HeadendConfig::load(&role.config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| headend::bank::BankServer::open(&cfg))
            .and_then(|bank| bank.funds.unlock(&account))
            .map(|()| println!("account {account} unlocked")),
        Command::InitDemo {
            dir,
            listen,
            embodiment,
            no_message_layer,
            split_base_port,
        } => assembly::split_addrs(listen.ip(), split_base_port)
            .and_then(|split| {
                let opts = assembly::DemoOptions {
                    gateway_listen: listen,
                    embodiment,
                    message_layer: !no_message_layer,
                    split,
                    ..Default::default()
                };
                assembly::init_demo(&dir, &opts)
            })
            .map(|f| {
                // stdout stays the config path (scripts read it); the PIN goes to the log.
                tracing::info!(account = assembly::DEMO_ACCOUNT, box_id = assembly::DEMO_BOX, pin_file = %f.pin_file.display(), "demo bank account: its PIN is in the PIN file");
                if let Some(s) = &f.split {
                    tracing::info!(gateway = %s.gateway.display(), payment = %s.payment.display(), merchant = %s.merchant.display(), bank = %s.bank.display(), load = %s.load.display(), "split deployment: one config per role");
                }
                println!("{}", f.config.display())
            })
            .map_err(|e| e.to_string()),
        Command::Collect { role, out } => payment_only(&role).and_then(|p| {
            let cfg = HeadendConfig::load(&role.config).map_err(|e| e.to_string())?;
            let dir = out.unwrap_or(cfg.state_dir);
            let mut closed = 0;
            // One batch per call, at most MAX_BATCH_RECORDS records: close until none is due.
            while let Some(b) = p.close_batch()? {
                let path = p.export_batch(b.batch, &dir)?;
                println!(
                    "batch {} with {} transactions: {}",
                    b.batch,
                    b.records.len(),
                    path.display()
                );
                closed += 1;
            }
            if closed == 0 {
                println!("nothing to collect");
            }
            Ok(())
        }),
        Command::Refund { role, txid, amount } => payment_only(&role).and_then(|p| {
            let r = headend::payment::refund::authorize(&p, &txid, amount)?;
            let card = match r.naming {
                headend::payment::privacy::CardNaming::Clear => format!("card {:X}", r.card_id),
                headend::payment::privacy::CardNaming::Pseudonym { .. } => {
                    format!("the sale's card (private: pseudonym {:X})", r.card_id)
                }
            };
            println!(
                "refund of sale {} authorized: {} to {card} (merchant {})",
                r.transaction_id, r.amount, r.merchant_id
            );
            Ok(())
        }),
        Command::Clearing(a) => rt().and_then(|rt| {
            rt.block_on(run_roles(
                a,
                Roles {
                    clearing: true,
                    ..Roles::NONE
                },
            ))
        }),
        Command::Settle { role, out } => HeadendConfig::load(&role.config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| {
                let c = headend::clearing::ClearingServer::open(&cfg)?;
                match c.settle()? {
                    Some(r) => {
                        let (json, csv) = headend::clearing::settle::write(
                            &r,
                            &out.unwrap_or(cfg.state_dir.clone()),
                        )?;
                        println!(
                            "settlement {}: {} batches, {} load advices: {} {}",
                            r.id,
                            r.batches.len(),
                            r.advices.len(),
                            json.display(),
                            csv.display()
                        );
                    }
                    None => println!("nothing to settle"),
                }
                Ok(())
            }),
        Command::Reconcile { role, state_dirs } => HeadendConfig::load(&role.config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| {
                let s = cfg.clearing.as_ref().ok_or("no [clearing] section")?;
                let j = headend::clearing::reconcile::Journals::find(&cfg, &state_dirs)?;
                let breaks =
                    headend::clearing::reconcile::reconcile(&j, &s.payment_servers, &s.funders)?;
                if breaks.is_empty() {
                    println!("reconciled: every invariant holds");
                    Ok(())
                } else {
                    for b in &breaks {
                        println!("BREAK {b}");
                    }
                    Err(format!("{} invariants broken", breaks.len()))
                }
            }),
        Command::Status(a) => HeadendConfig::load(&a.config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| headend::status::report_config(&cfg))
            .map(|r| print!("{r}")),
        Command::AckBatch { role, batch } => {
            payment_only(&role)
                .and_then(|p| p.ack_batch(batch))
                .map(|changed| {
                    if changed {
                        println!("batch {batch} acknowledged");
                    } else {
                        println!("batch {batch} was acknowledged already: nothing changed");
                    }
                })
        }
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

/// `headend hotlist …`.
fn hotlist(cmd: headend::cli::HotlistCommand) -> Result<(), String> {
    use headend::cli::HotlistCommand as H;
    use headend::hotlist;
    match cmd {
        H::Keygen { out } => {
            let (signing, verify) = hotlist::keygen(&out).map_err(|e| e.to_string())?;
            println!(
                "signing key {} (keep it with the issuer), verification key {}",
                signing.display(),
                verify.display()
            );
        }
        H::Sign {
            key,
            version,
            cards,
            out,
        } => {
            let list = proto::hotlist::Hotlist {
                version,
                card_ids: cards.into_iter().collect(),
            };
            let signed = hotlist::sign(&key, &list).map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&signed).map_err(|e| e.to_string())?;
            std::fs::write(&out, json + "\n").map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "hotlist version {version} with {} card(s) signed: {}",
                list.card_ids.len(),
                out.display()
            );
        }
        H::Install { role, file } => {
            let cfg = HeadendConfig::load(&role.config).map_err(|e| e.to_string())?;
            let h = cfg
                .hotlist
                .as_ref()
                .ok_or("the config has no [hotlist] section (verify_key_file)")?;
            let v = hotlist::Verifier::load(&h.verify_key_file).map_err(|e| e.to_string())?;
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let signed: proto::hotlist::SignedHotlist =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let mut roles = Vec::new();
            if let Some(p) = &cfg.payment {
                roles.push(p.name.clone());
            }
            if cfg.load.is_some() {
                roles.push("load".to_string());
            }
            if let Some(c) = &cfg.clearing {
                roles.push(c.name.clone());
            }
            if roles.is_empty() {
                return Err("no role here keeps a hotlist (payment, load, clearing)".into());
            }
            for r in roles {
                let target = cfg.journal_target(&r).map_err(|e| e.to_string())?;
                let j =
                    headend::journal::Journal::open_target(&target).map_err(|e| e.to_string())?;
                let list = hotlist::take(&j, &v, &signed).map_err(|e| format!("{r}: {e}"))?;
                println!(
                    "{r}: hotlist version {} with {} card(s) installed",
                    list.version,
                    list.card_ids.len()
                );
            }
        }
    }
    Ok(())
}
