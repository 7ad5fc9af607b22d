//! The thin tokio shell around the flows: builds the parts from the config and runs the
//! event loop until SIGTERM, ctrl-c or the remote's quit key.
//!
//! Top down (each module imports only the ones below it; none imports the runner):
//!
//! - [`runner`]: the event loop's state: UI intents, reader events, the purchase and load
//!   slots, the one-transaction-at-a-time guard, recovery triggers
//! - [`exec`]: the one executor for both flow slots (journal, card, gateway, show, done)
//! - [`recover`]: resolving in-doubt purchases and loads (journal, card log, recovery timer)
//! - [`parts`]: journal, card, gateway and the event channel, as the executor and recovery
//!   use them
//! - [`event`]: what the loop reacts to, and the status it publishes
//! - [`load`]: the `[load]` settings
//! - [`show`]: the flows' vocabulary → TV updates and local API reasons (wording: `ui::strings`)
//! - [`gateway`]: the QUIC connection to the head end
//! - [`card`]: reader driver, the open card session, card reads

pub mod card;
pub mod event;
pub mod exec;
pub mod gateway;
pub mod load;
pub mod parts;
pub mod prefetch;
pub mod recover;
pub mod runner;
pub mod show;

use std::sync::Arc;
use std::time::Duration;

use reader_drivers::ReaderDriver;
use tokio::sync::{mpsc, watch};
use ui::{App, AppConfig, UiEvent};

use crate::config::Config;
use crate::journal::Journal;
use card::CardPort;
use event::{Event, Status};
use gateway::{Gateway, GatewaySettings};
use parts::Parts;
use runner::Runner;

/// How the daemon meets the world besides its config: the reader driver, and where viewer
/// keys come from and whether the UI is drawn (tests inject keys and draw nothing).
pub struct Io {
    pub driver: Arc<dyn ReaderDriver>,
    pub reader_pattern: String,
    /// Keys (and resizes) from the remote; `None` with the UI off.
    pub keys: Option<mpsc::Receiver<UiEvent>>,
    pub draw: bool,
}

/// A running daemon's handles.
pub struct Handles {
    pub events: mpsc::Sender<Event>,
    pub status: watch::Receiver<Status>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    Gateway(#[from] gateway::GatewayError),
    #[error("{0}")]
    Setup(String),
}

/// The settings the gateway client takes from the config.
pub fn gateway_settings(cfg: &Config) -> GatewaySettings {
    GatewaySettings {
        addrs: cfg.headend.address.0.clone(),
        server_name: cfg.headend.server_name.clone(),
        server_role: cfg.headend.server_role.clone(),
        keep_alive: Duration::from_secs(cfg.headend.keep_alive_secs),
        idle_timeout: Duration::from_secs(cfg.headend.idle_timeout_secs),
        request_timeout: cfg.timeouts.network(),
        backoff_initial: Duration::from_millis(cfg.timeouts.reconnect_initial_ms),
        backoff_max: Duration::from_millis(cfg.timeouts.reconnect_max_ms),
    }
}

/// Runs until `shutdown` completes (or the viewer quits). `ready` gets the handles once the
/// parts are up.
pub async fn run(
    cfg: Config,
    io: Io,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(Handles),
) -> Result<(), DaemonError> {
    let journal = Journal::open(&cfg.state.dir)?;
    let s = gateway_settings(&cfg);
    let client = gateway::client_config(
        &cfg.headend.operator_ca,
        &cfg.headend.device_cert,
        &cfg.headend.device_key,
        &s,
    )?;
    let gw = Gateway::new(client, s)?;
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let (status_tx, status_rx) = watch::channel(Status {
        screen: ui::ScreenId::Home,
        offer: None,
        card_balance: None,
        last_outcome: None,
        flows_done: 0,
        recovered: 0,
        unresolvable: 0,
        recovery_calls: 0,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let keeper = {
        let tx = tx.clone();
        tokio::spawn(gw.clone().keep(
            move || {
                let _ = tx.try_send(Event::Connected);
            },
            stop_rx,
        ))
    };
    let mut reader_events = io.driver.events();
    let card = CardPort::new(
        io.driver.clone(),
        io.reader_pattern.clone(),
        cfg.timeouts.card(),
    );
    let app = App::new(AppConfig {
        offer_timeout_secs: cfg.timeouts.offer_secs,
    });
    let parts = Parts {
        journal,
        card,
        gateway: gw.clone(),
        events: tx.clone(),
        prefetch: prefetch::Prefetch::new(cfg.ui.prefetch_offers),
    };
    let mut runner = Runner::new(
        app,
        parts,
        cfg.ui.provider_name.clone(),
        Duration::from_secs(u64::from(cfg.timeouts.offer_secs)),
        status_tx,
        io.keys.is_some(),
    );
    runner.load_settings =
        load::LoadSettings::from_config(&cfg.load).map_err(DaemonError::Setup)?;
    runner.box_id = box_id_of(&cfg.headend.device_cert);
    let (initial, max) = cfg.timeouts.recovery();
    runner.recovery = recover::RecoverySlot::new(initial, max);
    match runner.parts.journal.unresolvable() {
        Ok(u) => {
            for (txid, why) in u {
                tracing::warn!(transaction_id = %txid, reason = %why, "unresolvable purchase in the journal; the operator must settle it");
            }
        }
        Err(e) => tracing::error!(error = %e, "journal: cannot list unresolvable purchases"),
    }
    let mut tui = if io.draw {
        Some(ui::terminal::Tui::enter().map_err(|e| DaemonError::Setup(format!("terminal: {e}")))?)
    } else {
        None
    };
    let mut keys = io.keys;
    ready(Handles {
        events: tx.clone(),
        status: status_rx,
    });
    tracing::info!(reader = %io.reader_pattern, driver = io.driver.kind(), headend = %cfg.headend.address, "stbd running");
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(t) = tui.as_mut() {
            if let Err(e) = t.draw(&runner.app) {
                tracing::error!(error = %e, "cannot draw the UI");
            }
        }
        runner.publish();
        let wants_ticks = runner.app.wants_ticks();
        let deadline = runner.offer_deadline();
        let recovery_due = runner.recovery_deadline();
        let prefetch_due = runner.prefetch_deadline();
        let go_on = tokio::select! {
            _ = &mut shutdown => false,
            Some(k) = async { keys.as_mut()?.recv().await }, if keys.is_some() => runner.ui(k).await,
            Some(ev) = reader_events.recv() => runner.event(Event::Reader(ev)).await,
            Some(ev) = rx.recv() => runner.event(ev).await,
            // Ticks only while a countdown or spinner shows: an idle box sleeps.
            _ = tick.tick(), if wants_ticks => runner.ui(UiEvent::Tick).await,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                runner.offer_timed_out().await;
                true
            }
            _ = async { tokio::time::sleep_until(recovery_due.expect("guarded")).await }, if recovery_due.is_some() => {
                runner.recovery_timer().await;
                true
            }
            _ = async { tokio::time::sleep_until(prefetch_due.expect("guarded")).await }, if prefetch_due.is_some() => {
                runner.prefetch_due();
                true
            }
        };
        if !go_on {
            break;
        }
    }
    tracing::info!("stbd shutting down");
    let _ = stop_tx.send(true);
    drop(tui);
    let _ = tokio::time::timeout(Duration::from_secs(3), keeper).await;
    Ok(())
}

/// The box id this box's device certificate carries (its URI SAN), if it reads; the
/// gateway checks the same certificate, so a wrong one fails there too.
fn box_id_of(cert: &std::path::Path) -> Option<String> {
    let chain = transport::config::load_certs(cert).ok()?;
    let leaf = chain.first()?;
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let peer = transport::identity::identity_of(leaf, any).ok()?;
    peer.box_id().map(|b| b.as_str().to_string())
}

/// Resolves when SIGTERM or ctrl-c arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt"),
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
