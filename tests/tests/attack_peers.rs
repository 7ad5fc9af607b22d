//! Issue 12, case 1: who may call whom. Each role of a split head end (five `headend`
//! processes) serves only the peers its `callers` list names (default: the gateway); the
//! gateway serves boxes only; `issue-server` certificates and role certificates issued
//! without `--client` cannot be clients at all. Every role × every message kind × every
//! wrong kind of peer, over the attacker's own QUIC client; then the original
//! attack, a load request straight to the load server's port.
//!
//! Each test checks the refusal and its reason, that no value moved (journals and card
//! files), and that an honest box completes purchases during the attack and right after.

mod attack;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use attack::boxes::{BoxClient, card_balance, new_card};
use attack::deploy::{HeadEnd, ROLES};
use attack::ledger::{self, Ledger};
use attack::samples::{self, CardData};
use attack::wire::{self, Identity, Outcome};
use attack::*;
use proto::messages::*;
use proto::money::{Currency, Money};
use reader_drivers::vcard::VirtualCard;

/// The attacker's own genuine card: what it answers to READ PURSE, INITIALIZE FOR PURCHASE
/// and INITIALIZE FOR LOAD.
fn card_data(he: &HeadEnd, path: &std::path::Path) -> CardData {
    use proto::apdu::{CardApplication, Response};
    use proto::card::commands;
    use proto::purse::*;
    let mut card = VirtualCard::open(path).expect("card");
    let mut apdu = |a: &[u8]| Response::parse(&card.process_apdu(a)).expect("sw");
    apdu(&commands::select());
    let purse = PurseInfo::decode(&apdu(&commands::read_purse()).data).expect("purse");
    let init = PurchaseInit::decode(&apdu(&commands::init_purchase(attack::boxes::today())).data)
        .expect("init");
    apdu(&commands::select());
    let r = apdu(&commands::init_load(&LoadInitRequest {
        amount: 20_000,
        currency: Currency::EUR,
        timestamp: headend::bank::now_secs(),
        date: attack::boxes::today(),
    }));
    let load_init = LoadInit::decode(&r.data).expect("load init");
    let _ = he;
    CardData {
        purse,
        init,
        load_init,
    }
}

/// A certificate the operator CA signed by mistake: client authentication, but neither a
/// box id nor a role name (the "other" kind of peer; only a `sha256:` entry could let it in).
fn misissued_client_cert(he: &HeadEnd) -> Identity {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    // Re-create the issuer the way `headend pki` does (its subject carries a hash of its key).
    let key_pem = std::fs::read_to_string(he.d.join("ca/ca.key.pem")).expect("CA key");
    let ca_key = KeyPair::from_pem(&key_pem).expect("CA key");
    let mut p = CertificateParams::default();
    let tag = hex::encode(
        &ring::digest::digest(&ring::digest::SHA256, ca_key.public_key_der().as_slice()).as_ref()
            [..8],
    );
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{} {tag}", headend::pki::CA_COMMON_NAME),
    );
    dn.push(DnType::OrganizationName, "Purselink");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = p.self_signed(&ca_key).expect("issuer");
    let mut leaf = CertificateParams::new(vec!["partner.example.net".to_string()]).expect("leaf");
    leaf.subject_alt_names
        .push(SanType::DnsName("partner.example.net".try_into().unwrap()));
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &issuer, &ca_key).expect("signed");
    Identity {
        label: "operator-CA certificate with clientAuth but no role name or box id".into(),
        chain: vec![cert.der().clone()],
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

/// A certificate from another CA naming itself the gateway.
fn foreign_gateway_cert() -> Identity {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(SanType::URI(
        "urn:purselink:role:gateway".try_into().unwrap(),
    ));
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Identity {
        label: "another CA's certificate naming the gateway role".into(),
        chain: vec![cert.der().clone()],
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

/// What a wrong peer must get from a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The handshake fails (a TLS alert): the certificate cannot be a client here.
    Tls,
    /// Every message is answered `Forbidden`, with a reason containing this text.
    Forbidden(&'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_refuses_every_message_from_every_wrong_peer() {
    let mut he = HeadEnd::start("peers", |_, _| {});
    let honest = BoxClient::new(&he, "box-000101", 700_101, 50_000).await;
    let honest_card = honest.card_path.clone();
    let attacker_card = new_card(&he, "attacker", 700_666, 5_000);
    let card = card_data(&he, &attacker_card);
    let before = Ledger::read(
        &he,
        &[("honest", &honest_card), ("attacker", &attacker_card)],
    );
    let steps_before: BTreeMap<&str, (usize, usize)> = ROLES
        .iter()
        .map(|r| (*r, ledger::size(&he.journal(r))))
        .collect();
    let honest = HonestLoop::start(honest, Duration::from_millis(2500));

    let device = he.device("box-000666");
    let peers: Vec<(Identity, [Expect; 5])> = {
        use Expect::*;
        // Per role, in ROLES order: gateway, payment, merchant, bank, load.
        let back = |why| [Forbidden("serves set-top boxes only"), why, why, why, why];
        vec![
            (
                device.clone(),
                [
                    // The gateway's own business (a box): covered by the next test.
                    Forbidden("-"),
                    Forbidden("set-top boxes reach this role through the gateway"),
                    Forbidden("set-top boxes reach this role through the gateway"),
                    Forbidden("set-top boxes reach this role through the gateway"),
                    Forbidden("set-top boxes reach this role through the gateway"),
                ],
            ),
            (he.server_cert("shop.example.net"), [Tls; 5]),
            (he.own_role_cert("merchant"), [Tls; 5]),
            // The load server sends load advices to clearing, so its own certificate may
            // be a client: every role here still refuses it (no `callers` list names it).
            (
                he.own_role_cert("load"),
                back(Forbidden("is not among this role's callers")),
            ),
            (he.role_cert("gateway", false), [Tls; 5]),
            (
                he.role_cert("merchant", true),
                back(Forbidden("is not among this role's callers")),
            ),
            (
                he.role_cert("payment", true),
                back(Forbidden("is not among this role's callers")),
            ),
            (
                he.role_cert("bank", true),
                back(Forbidden("is not among this role's callers")),
            ),
            (
                he.role_cert("load", true),
                back(Forbidden("is not among this role's callers")),
            ),
            (
                he.role_cert("internet-merchant", true),
                back(Forbidden("is not among this role's callers")),
            ),
            (
                misissued_client_cert(&he),
                back(Forbidden("(no role name) (certificate sha256:")),
            ),
            (foreign_gateway_cert(), [Tls; 5]),
        ]
    };
    let roots = wire::roots(&he.ca_pem());
    let messages = samples::every(&card, "TX-ATTACK-1", "box-000101", &he.voucher);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut calls = 0;
    for (peer, expects) in &peers {
        for (role, expect) in ROLES.iter().zip(expects) {
            if *role == "gateway" && peer.label == device.label {
                continue;
            }
            let what = format!("{} → {role}", peer.label);
            let cfg = wire::client_config(roots.clone(), Some(peer), &[wire::ALPN]);
            let conn = wire::connect(he.addrs.of(role), cfg).await;
            match (expect, conn) {
                (Expect::Tls, Err(o)) => {
                    assert!(o.is_tls_refusal(), "{what}: {o:?}");
                    *tally.entry(format!("TLS refusal {o:?}")).or_default() += 1;
                }
                (Expect::Tls, Ok(conn)) => {
                    // With TLS 1.3 the client finishes first: the server's verdict on the
                    // client certificate arrives as the close of the connection.
                    for m in &messages {
                        let o = conn.call(m).await;
                        calls += 1;
                        assert!(
                            o.is_tls_refusal(),
                            "{what}: {} was not refused at TLS: {o:?}",
                            samples::name(m)
                        );
                        *tally
                            .entry(match &o {
                                Outcome::Closed {
                                    tls_alert, reason, ..
                                } => format!("TLS alert {tls_alert:?}: {reason}"),
                                other => format!("{other:?}"),
                            })
                            .or_default() += 1;
                    }
                }
                (Expect::Forbidden(text), Err(o)) => {
                    panic!("{what}: expected Forbidden ({text}), the handshake failed: {o:?}")
                }
                (Expect::Forbidden(text), Ok(conn)) => {
                    for m in &messages {
                        let o = conn.call(m).await;
                        calls += 1;
                        let e = o
                            .error()
                            .unwrap_or_else(|| panic!("{what}: {} got {o:?}", samples::name(m)));
                        assert_eq!(
                            e.code,
                            ErrorCode::Forbidden,
                            "{what}: {}: {e:?}",
                            samples::name(m)
                        );
                        assert!(
                            e.reason.contains(text),
                            "{what}: {}: reason {:?} lacks {text:?}",
                            samples::name(m),
                            e.reason
                        );
                        *tally
                            .entry(format!(
                                "Forbidden: {}",
                                e.reason.split(" (").next().unwrap()
                            ))
                            .or_default() += 1;
                    }
                }
            }
        }
    }
    he.assert_alive();
    eprintln!(
        "peers: {} wrong-peer connections, {calls} messages of {} kinds; refusals seen:",
        peers.len() * 5 - 1,
        samples::KINDS
    );
    for (k, n) in &tally {
        eprintln!("  {n:5} × {k}");
    }

    let report = honest.finish().await;
    assert_honest_during(&report, "peers");
    let mut client = report.client;
    let last = honest_after(&mut client, "peers").await;
    let mut bought: Vec<(&str, &attack::boxes::Purchase)> =
        report.purchases.iter().map(|p| ("honest", p)).collect();
    bought.push(("honest", &last));
    let after = Ledger::read(
        &he,
        &[("honest", &honest_card), ("attacker", &attacker_card)],
    );
    before.assert_only(&after, &bought, "peers");
    // A refused peer is refused before its message is looked at: nothing journaled at the
    // back ends beyond the honest purchases (the gateway journals only those).
    for role in ["bank", "load"] {
        assert_eq!(
            ledger::size(&he.journal(role)),
            steps_before[role],
            "{role}: the journal grew during the attack"
        );
    }
}

/// A box (a genuine device certificate) sending the gateway what only roles send: every
/// kind that is not a box's is refused, and the box kinds with a made-up transaction are
/// refused without a trace of value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_role_messages_from_a_box() {
    let mut he = HeadEnd::start("box_to_gateway", |_, _| {});
    let honest = BoxClient::new(&he, "box-000102", 700_102, 50_000).await;
    let honest_card = honest.card_path.clone();
    let mut attacker = BoxClient::new(&he, "box-000667", 700_667, 5_000).await;
    let attacker_card = attacker.card_path.clone();
    let card = CardData {
        purse: attacker.purse(),
        init: attacker.init_purchase(),
        load_init: {
            let offer = LoadOffer {
                transaction_id: "x".into(),
                source: LoadSource::voucher("x"),
                max_amount: Money::new(20_000, Currency::EUR),
                limited_by: "card".into(),
                timestamp: headend::bank::now_secs(),
                date: attack::boxes::today(),
                pin_required: false,
            };
            attacker.init_load(&offer, 20_000)
        },
    };
    let cards = [
        ("honest", honest_card.as_path()),
        ("attacker", &attacker_card),
    ];
    let before = Ledger::read(&he, &cards);
    let honest = HonestLoop::start(honest, Duration::from_millis(2500));
    // A transaction of the honest box's, so routed messages name a real one.
    let messages = samples::every(&card, "TX-NOT-OFFERED", "box-000102", &he.voucher);
    let box_kinds = [
        "OfferRequest",
        "DrawRequest",
        "DebitResponse",
        "Cancel",
        "CatalogRequest",
        "LoadOfferRequest",
        "LoadRequest",
        "LoadResponse",
        "RefundsDueRequest",
        "RefundRequest",
        "RefundResponse",
        "RefundProof",
        "TransferInvite",
        "TransferJoin",
        "TransferPost",
        "TransferFetch",
    ];
    for m in &messages {
        let kind = samples::name(m);
        let o = attacker.call(m).await;
        if box_kinds.contains(&kind) {
            match (kind, &o) {
                ("OfferRequest", Outcome::Answer(Message::Offer(_))) => {}
                ("CatalogRequest", Outcome::Answer(Message::Catalog(_))) => {}
                // Its own card has no refund due.
                ("RefundsDueRequest", Outcome::Answer(Message::RefundsDue(d))) if d.is_empty() => {}
                // Another box's voucher: the one refusal for "no such" and "not yours".
                ("LoadOfferRequest", o) if o.is_error(ErrorCode::NotYourAccount) => {}
                // A transfer id must start with the box's own id; so no transfer exists
                // for the post and the fetch (UnknownTransaction, below).
                ("TransferInvite", o) if o.is_error(ErrorCode::Malformed) => {}
                // By then this box's refused steps used up its budget (the limit at work).
                (k, o) if k.starts_with("Transfer") && o.is_error(ErrorCode::RateLimited) => {}
                (_, o) if o.is_error(ErrorCode::UnknownTransaction) => {}
                _ => panic!("box kind {kind}: {o:?}"),
            }
            eprintln!("box_to_gateway: {kind}: {}", short(&o));
        } else {
            let e = o
                .error()
                .unwrap_or_else(|| panic!("{kind} from a box was answered: {o:?}"));
            assert_eq!(e.code, ErrorCode::Malformed, "{kind}: {e:?}");
            assert!(
                e.reason.starts_with("a box cannot send"),
                "{kind}: {}",
                e.reason
            );
        }
    }
    eprintln!(
        "box_to_gateway: {} role-only kinds refused: Malformed \"a box cannot send …\"",
        samples::KINDS - box_kinds.len()
    );
    he.assert_alive();
    let report = honest.finish().await;
    assert_honest_during(&report, "box_to_gateway");
    let mut client = report.client;
    let last = honest_after(&mut client, "box_to_gateway").await;
    let mut bought: Vec<_> = report.purchases.iter().map(|p| ("honest", p)).collect();
    bought.push(("honest", &last));
    before.assert_only(&Ledger::read(&he, &cards), &bought, "box_to_gateway");
}

fn short(o: &Outcome) -> String {
    match o {
        Outcome::Answer(Message::Error(e)) => format!("{:?}: {}", e.code, e.reason),
        Outcome::Answer(m) => samples::name(m).to_string(),
        other => format!("{other:?}"),
    }
}

/// The original attack: value straight from the load server's port. Every peer but
/// the gateway is refused before the message is read; and even with the gateway's own
/// certificate (a compromised gateway), a plain load request is `Forbidden` and a routed one
/// needs a hold carrying the funder's MAC for exactly this transaction, amount and card —
/// forged, altered and replayed holds load nothing. Any load command that did come back is
/// applied to the attacker's card, so a success would show on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_request_straight_to_the_load_server_loads_nothing() {
    let mut he = HeadEnd::start("load_direct", |_, _| {});
    // The demo box with the demo voucher: an honest load whose hold the attacker then
    // tries to reuse.
    let mut funded = BoxClient::new(&he, "box-000001", 700_001, 1_000).await;
    let conf = funded
        .load(LoadSource::voucher(he.voucher.clone()), 2_000, None)
        .await
        .expect("the honest voucher load");
    let genuine: HoldPlaced = {
        let rows = ledger::state(&he.journal("gateway"), "gwload");
        let rec: headend::gateway::load::GwLoad = headend::journal::decode(
            &rows
                .iter()
                .find(|(k, _)| *k == conf.transaction_id)
                .expect("the honest load at the gateway")
                .1,
        )
        .unwrap();
        rec.hold.expect("its hold")
    };
    let honest = BoxClient::new(&he, "box-000103", 700_103, 50_000).await;
    let honest_card = honest.card_path.clone();
    let mut attacker = BoxClient::new(&he, "box-000668", 700_668, 5_000).await;
    let attacker_card = attacker.card_path.clone();
    let cards = [
        ("honest", honest_card.as_path()),
        ("attacker", &attacker_card),
        ("funded", &funded.card_path),
    ];
    let before = Ledger::read(&he, &cards);
    let honest = HonestLoop::start(honest, Duration::from_millis(2500));

    // The attacker's genuine S1 for 200.00 EUR, under a time stamp of its choosing.
    let fake_offer = LoadOffer {
        transaction_id: "LD-ATTACK-0001".into(),
        source: LoadSource::voucher(he.voucher.clone()),
        max_amount: Money::new(20_000, Currency::EUR),
        limited_by: "card".into(),
        timestamp: headend::bank::now_secs(),
        date: attack::boxes::today(),
        pin_required: false,
    };
    let request = attacker.load_request(&fake_offer, 20_000, None);
    let card_id = request.init.card_id;
    let roots = wire::roots(&he.ca_pem());
    let load = he.addrs.load;
    let mut commands = Vec::new();

    // 1. Every identity but the gateway's: refused before the message is read.
    for peer in [
        he.server_cert("shop.example.net"),
        he.own_role_cert("merchant"),
        he.device("box-000668"),
        he.role_cert("merchant", true),
        he.role_cert("bank", true),
    ] {
        let cfg = wire::client_config(roots.clone(), Some(&peer), &[wire::ALPN]);
        for m in [
            Message::LoadRequest(request.clone()),
            Message::RoutedLoadRequest {
                request: request.clone(),
                hold: genuine.clone(),
            },
        ] {
            let o = match wire::connect(load, cfg.clone()).await {
                Err(o) => o,
                Ok(c) => c.call(&m).await,
            };
            assert!(
                o.is_tls_refusal() || o.is_error(ErrorCode::Forbidden),
                "{} → load: {}: {o:?}",
                peer.label,
                samples::name(&m)
            );
            eprintln!(
                "load_direct: {} → load, {}: {}",
                peer.label,
                samples::name(&m),
                short(&o)
            );
        }
    }

    // 2. The gateway's own certificate (a compromised gateway).
    let gw = he.own_role_cert("gateway");
    let conn = wire::connect(
        load,
        wire::client_config(roots.clone(), Some(&gw), &[wire::ALPN]),
    )
    .await
    .expect("the gateway's certificate connects");
    let o = conn.call(&Message::LoadRequest(request.clone())).await;
    assert!(
        o.is_error(ErrorCode::Forbidden),
        "plain load request: {o:?}"
    );
    assert!(
        reason(&o, "plain").contains("only through the gateway, with the funder's hold"),
        "{o:?}"
    );
    eprintln!(
        "load_direct: gateway cert, plain LoadRequest: {}",
        short(&o)
    );

    let forged_mac = HoldPlaced {
        transaction_id: request.transaction_id.clone(),
        amount: request.amount,
        card_id,
        mac: [0x42; 8],
    };
    let mut raised = genuine.clone();
    raised.amount = Money::new(genuine.amount.minor * 10, Currency::EUR);
    let mut moved = genuine.clone();
    moved.card_id = card_id;
    let mut renamed = genuine.clone();
    renamed.transaction_id = request.transaction_id.clone();
    let mut under_genuine_txid = request.clone();
    under_genuine_txid.transaction_id = genuine.transaction_id.clone();
    under_genuine_txid.amount = genuine.amount;
    let cases: Vec<(&str, LoadRequest, HoldPlaced, ErrorCode, &str)> = vec![
        (
            "forged MAC",
            request.clone(),
            forged_mac,
            ErrorCode::Forbidden,
            "does not carry its funder's MAC",
        ),
        (
            "genuine hold, amount raised ×10",
            request.clone(),
            raised,
            ErrorCode::Forbidden,
            "does not carry its funder's MAC",
        ),
        (
            "genuine hold moved to the attacker's card",
            request.clone(),
            moved,
            ErrorCode::Forbidden,
            "does not carry its funder's MAC",
        ),
        (
            "genuine hold renamed to the attacker's transaction",
            request.clone(),
            renamed,
            ErrorCode::Forbidden,
            "does not carry its funder's MAC",
        ),
        (
            "genuine hold, unchanged, for the attacker's request",
            request.clone(),
            genuine.clone(),
            ErrorCode::AmountMismatch,
            "is not what the funder holds",
        ),
        (
            "genuine hold with the attacker's card under its transaction id",
            under_genuine_txid,
            genuine.clone(),
            ErrorCode::AmountMismatch,
            "is not what the funder holds",
        ),
    ];
    for (what, req, hold, code, text) in cases {
        let o = conn
            .call(&Message::RoutedLoadRequest { request: req, hold })
            .await;
        if let Outcome::Answer(Message::LoadCommand(c)) = &o {
            commands.push((what, c.clone()));
        }
        assert!(o.is_error(code), "{what}: {o:?}");
        assert!(reason(&o, what).contains(text), "{what}: {o:?}");
        eprintln!(
            "load_direct: gateway cert, RoutedLoadRequest, {what}: {}",
            short(&o)
        );
    }
    // Whatever came back as a load command goes to the attacker's card.
    for (what, c) in &commands {
        let r = attacker.apdu(&proto::card::commands::load(&c.command));
        eprintln!("load_direct: LOAD with the command from {what}: {}", r.sw);
    }
    assert_eq!(card_balance(&attacker_card), 5_000, "the attacker's card");
    he.assert_alive();

    let report = honest.finish().await;
    assert_honest_during(&report, "load_direct");
    let mut client = report.client;
    let last = honest_after(&mut client, "load_direct").await;
    let mut bought: Vec<_> = report.purchases.iter().map(|p| ("honest", p)).collect();
    bought.push(("honest", &last));
    before.assert_only(&Ledger::read(&he, &cards), &bought, "load_direct");
    // The load server journaled nothing for the attacker's transaction.
    let at_load: Vec<_> = ledger::steps(&he.journal("load"))
        .into_iter()
        .filter(|(t, _, _)| t == "LD-ATTACK-0001")
        .collect();
    assert!(at_load.is_empty(), "{at_load:?}");
}

/// The allow-lists let in exactly whom they name: a role listed by name (the bank listing
/// the load server) and a certificate listed by `sha256:` fingerprint (the payment server
/// listing a partner's certificate) get through there and nowhere else; a certificate with
/// the same name but another key does not get through a fingerprint entry. What a listed
/// peer may then send is printed: the lists are per role, not per message kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_lists_let_in_exactly_whom_they_name() {
    let mut he = HeadEnd::start("callers", |role, t| {
        if role == "bank" {
            attack::deploy::set(
                t,
                "bank",
                "callers",
                toml::Value::Array(vec!["gateway".into(), "load".into()]),
            );
        }
    });
    let partner = misissued_client_cert(&he);
    let impostor = misissued_client_cert(&he);
    he.stop("payment");
    attack::deploy::edit_config(&he.config("payment"), |t| {
        attack::deploy::set(
            t,
            "payment",
            "callers",
            toml::Value::Array(vec![
                "gateway".into(),
                format!("sha256:{}", partner.fingerprint()).into(),
            ]),
        )
    });
    he.spawn("payment");
    let honest = BoxClient::new(&he, "box-000104", 700_104, 50_000).await;
    let honest_card = honest.card_path.clone();
    let attacker_card = new_card(&he, "attacker", 700_669, 5_000);
    let card = card_data(&he, &attacker_card);
    let cards = [
        ("honest", honest_card.as_path()),
        ("attacker", &attacker_card),
    ];
    let before = Ledger::read(&he, &cards);
    let honest = HonestLoop::start(honest, Duration::from_millis(2500));
    let roots = wire::roots(&he.ca_pem());
    let load_client = he.role_cert("load", true);
    let probe = Message::ReversalsSince { after: 0 };
    for (peer, allowed_at) in [
        (&load_client, "bank"),
        (&partner, "payment"),
        (&impostor, "-"),
    ] {
        let cfg = wire::client_config(roots.clone(), Some(peer), &[wire::ALPN]);
        for role in ["payment", "merchant", "bank", "load"] {
            let conn = wire::connect(he.addrs.of(role), cfg.clone())
                .await
                .expect("connects");
            let o = conn.call(&probe).await;
            if role == allowed_at {
                assert!(
                    !o.is_error(ErrorCode::Forbidden) && matches!(o, Outcome::Answer(_)),
                    "{} → {role}: {o:?}",
                    peer.label
                );
            } else {
                assert!(
                    o.is_error(ErrorCode::Forbidden),
                    "{} → {role}: {o:?}",
                    peer.label
                );
            }
            eprintln!("callers: {} → {role}: {}", peer.label, short(&o));
        }
    }
    // What the listed load-role certificate may ask of the bank: every kind the bank takes,
    // naming any box (the bank believes the box id its caller gives).
    let conn = wire::connect(
        he.addrs.bank,
        wire::client_config(roots.clone(), Some(&load_client), &[wire::ALPN]),
    )
    .await
    .unwrap();
    let offer = conn
        .call(&Message::RoutedLoadOfferRequest {
            box_id: "box-000001".into(),
            request: LoadOfferRequest {
                source: LoadSource::Bank {
                    account: "ACC-0001".into(),
                },
                card: card.purse.clone(),
            },
        })
        .await;
    eprintln!(
        "callers: the load role's certificate, listed by the bank, asks for a load offer on \
         box-000001's account onto the attacker's card: {}",
        short(&offer)
    );
    if let Outcome::Answer(Message::LoadOffer(o)) = &offer {
        let hold = conn
            .call(&Message::HoldRequest(HoldRequest {
                box_id: "box-000001".into(),
                transaction_id: o.transaction_id.clone(),
                source: o.source.clone(),
                amount: Money::new(10_000, Currency::EUR),
                card_id: card.purse.card_id,
                card_balance: card.purse.balance,
                card_max_balance: card.purse.max_balance,
                sealed_pin: None,
            }))
            .await;
        eprintln!("callers: … and a hold without the PIN: {}", short(&hold));
        assert!(
            !matches!(hold, Outcome::Answer(Message::HoldPlaced(_))),
            "a hold without the PIN: {hold:?}"
        );
    }
    he.assert_alive();
    let report = honest.finish().await;
    assert_honest_during(&report, "callers");
    let mut client = report.client;
    let last = honest_after(&mut client, "callers").await;
    let mut bought: Vec<_> = report.purchases.iter().map(|p| ("honest", p)).collect();
    bought.push(("honest", &last));
    before.assert_only(&Ledger::read(&he, &cards), &bought, "callers");
}
