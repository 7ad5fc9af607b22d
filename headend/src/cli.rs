//! The `headend` command line: one [`Command`] enum, a variant per subcommand. Roles (`gateway`,
//! `payment`, `merchant`, `bank`, `load`, `all-in-one`) are added as variants taking
//! [`RoleArgs`], so `--config` is defined once.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::quic::BoxId;

#[derive(Debug, Parser)]
#[command(name = "headend", version, about = "Purselink head end")]
pub struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax); `RUST_LOG` wins when set.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Development PKI: operator CA, device and server certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The issuer's card hotlist: keys, signing, installing a signed list.
    #[command(subcommand)]
    Hotlist(HotlistCommand),
    /// The load server's PKCS#11 token ([load] token): import the load masters into it.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Every role in one process on SQLite: the embedded default.
    AllInOne(RoleArgs),
    /// The gateway alone: boxes' QUIC endpoint, routing to remote roles.
    Gateway(RoleArgs),
    /// The payment server alone, with its security-card pool.
    Payment(RoleArgs),
    /// The merchant role alone: cable catalog and internet merchants.
    Merchant(RoleArgs),
    /// The bank server alone: accounts, PIN, holds, transfer to the issuer float.
    Bank(RoleArgs),
    /// The load server alone, with its host security module and pre-funded accounts.
    Load(RoleArgs),
    /// The clearing role alone: receives collection batches and load advices.
    Clearing(RoleArgs),
    /// Settle what clearing received and has not settled: writes
    /// settlement-<day>-<id>.json and .csv (the clearing role's config).
    Settle {
        #[command(flatten)]
        role: RoleArgs,
        /// Where the report files go (default: the state directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check the cross-ledger invariants from the journals (the clearing role's config):
    /// exits non-zero naming each transaction that breaks one.
    Reconcile {
        #[command(flatten)]
        role: RoleArgs,
        /// Directories holding the journals (`<role>.sqlite`) of clearing, the payment
        /// servers and the funders it names; repeat for several (default: the state
        /// directory).
        #[arg(long = "state-dir")]
        state_dirs: Vec<PathBuf>,
    },
    /// Unlock a bank account locked after wrong PINs (operator command).
    BankUnlock {
        #[command(flatten)]
        role: RoleArgs,
        #[arg(long)]
        account: String,
    },
    /// Write a complete dev deployment (CA, certificates, keys, config) into a directory.
    InitDemo {
        #[arg(long)]
        dir: PathBuf,
        /// UDP address for the gateway.
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: std::net::SocketAddr,
        /// Who compares the card signature: security-card, payment-server, gateway, merchant.
        #[arg(long, default_value = "security-card")]
        embodiment: String,
        /// Turn the FIG. 8 message layer off.
        #[arg(long)]
        no_message_layer: bool,
        /// Also write DIR/split/<role>.toml, one process per role: payment, merchant, bank
        /// and load listen on the gateway's IP address at PORT+1, PORT+2, PORT+3, PORT+4.
        #[arg(long, value_name = "PORT")]
        split_base_port: Option<u16>,
    },
    /// Close a collection batch (journaled, and queued for clearing when `[payment]
    /// clearing` is set): writes collection-<batch>.json.
    Collect {
        #[command(flatten)]
        role: RoleArgs,
        /// Where the collection file goes (default: the state directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Authorize the refund of a completed sale (the merchant's decision, issue 17): the
    /// card it debited is credited at its box's next refunds-due request, once. Refused for
    /// a sale not completed, a second refund, or more than the sale.
    Refund {
        #[command(flatten)]
        role: RoleArgs,
        /// The sale's transaction id.
        #[arg(long)]
        txid: String,
        /// The amount in minor units of the sale's currency (default: the whole sale).
        #[arg(long)]
        amount: Option<u64>,
    },
    /// Report what the journals hold: the SQLite files in the state directory and the roles
    /// on PostgreSQL (read-only).
    Status(RoleArgs),
    /// Record the acquirer's acknowledgement of a collection batch (without a clearing
    /// role; clearing's own acknowledgement is recorded when it is received).
    AckBatch {
        #[command(flatten)]
        role: RoleArgs,
        #[arg(long)]
        batch: u64,
    },
}

/// Flags every role takes.
#[derive(Debug, Clone, Args)]
pub struct RoleArgs {
    /// The role's TOML configuration.
    #[arg(long, default_value = "/etc/purselink/headend.toml")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum HotlistCommand {
    /// Make the issuer's hotlist keys: DIR/hotlist-signing.pk8 (owner-only; it stays with
    /// the issuer) and DIR/hotlist-verify.pub (for every role's `[hotlist] verify_key_file`).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a hotlist version: the blocked card ids, written to OUT as JSON.
    Sign {
        /// The signing key (`keygen`'s hotlist-signing.pk8).
        #[arg(long)]
        key: PathBuf,
        /// Greater than every version signed before: roles never take an older list.
        #[arg(long)]
        version: u64,
        /// A blocked card id (decimal, or hex with 0x); repeat for several, none for an
        /// empty list (unblocks every card).
        #[arg(long = "card", value_parser = parse_card_id)]
        cards: Vec<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Install a signed hotlist (`sign`'s file) into the journals of the roles this config
    /// runs that keep one (payment server, load server, clearing), after checking it with
    /// the config's `[hotlist] verify_key_file`; their running processes take it at their
    /// next refresh, and clearing hands it on.
    Install {
        #[command(flatten)]
        role: RoleArgs,
        #[arg(long)]
        file: PathBuf,
    },
}

/// A card id: decimal, or hex with `0x`.
fn parse_card_id(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a self-signed operator CA: DIR/ca.crt.pem and DIR/ca.key.pem.
    InitCa {
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue a set-top box device certificate: OUT/<box-id>.crt.pem and .key.pem.
    IssueDevice {
        /// The CA directory made by `init-ca`.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        box_id: BoxId,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a head-end role's certificate (URI SAN urn:purselink:role:ROLE, which the other
    /// roles' `callers` lists name): OUT/ROLE.crt.pem and .key.pem. Server authentication;
    /// with --client also client authentication (the gateway, which calls the other roles).
    IssueRole {
        #[arg(long)]
        ca: PathBuf,
        /// The role name: gateway, payment, merchant, bank, load, or an instance's own name.
        #[arg(long)]
        role: String,
        /// DNS name or IP address the role is reached at; repeat for several.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Also allow the certificate to authenticate as a client (to call other roles).
        #[arg(long)]
        client: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a server certificate (server authentication only: it can never call a role):
    /// OUT/<first name>.crt.pem and .key.pem.
    IssueServer {
        #[arg(long)]
        ca: PathBuf,
        /// DNS name or IP address; repeat for several (e.g. --name gateway.purselink.test
        /// --name localhost --name 127.0.0.1).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// `headend hsm …`.
#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Import load master keys into the token the config's `[load] token` names: each
    /// version sensitive and not extractable, labelled KEY_LABEL-vN; versions already there
    /// are left. Delete the key file afterwards: the token holds the keys from then on.
    Import {
        #[command(flatten)]
        role: RoleArgs,
        /// The load keys file (one key, or `[[keys]]` generations).
        #[arg(long)]
        keys: PathBuf,
    },
}
