//! Issue 15, the issuer float (001 [0056], [0135]) on the all-in-one head end, whose
//! payment server, bank and load server send their batches and load advices to the clearing
//! role in process: after L loads (bank and pre-funded voucher), P purchases across several
//! cards, a refund and an unload (issue 17), the settlement run's issuer float = captured
//! loads − unloads − settled purchases + refunds,
//! float + acquirer payables = what left the funders' accounts, the float = the change in
//! the cards' balances (read from the cards), and reconcile — funders included — finds
//! nothing.

mod load_support;
#[path = "wire_box/mod.rs"]
mod wire_box;

use headend::clearing::reconcile::{Journals, reconcile};
use headend::journal::Kind;
use headend::payment::collection::BatchState;
use load_support::pg_rig;
use load_support::*;
use proto::messages::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_is_loads_less_settled_purchases_and_matches_the_cards() {
    float_case(pg_rig::Backend::Sqlite).await;
}

/// The same with every role, clearing included, journaling on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_is_loads_less_settled_purchases_on_postgres_too() {
    float_case(pg_rig::Backend::Postgres).await;
}

async fn float_case(backend: pg_rig::Backend) {
    let Some(he) = start_on(backend).await else {
        return;
    };
    // Loads: two from the bank account (box 1), one from the pre-funded voucher (box 2).
    let mut l1 = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let mut l2 = LoadBox::new(&he, BOX2, 0, 100_000).await;
    let mut loaded = 0;
    for (which, source, amount, pin) in [
        (1, bank_source(), 5_000, Some(he.pin.as_str())),
        (1, bank_source(), 2_500, Some(he.pin.as_str())),
        (2, voucher_source("VOUCHER-0002"), 5_000, None),
    ] {
        let b = if which == 1 { &mut l1 } else { &mut l2 };
        let (_, answer) = b.load(source, amount, pin).await;
        assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
        loaded += amount;
    }
    // Purchases from two other cards.
    let gw = he.running.gateway_addr.unwrap();
    let ca = he.dir.path().join("ca");
    let mut spent = 0;
    let mut sales = Vec::new();
    let mut buyers = Vec::new();
    let issuer = issuer_keys(&he.cfg);
    for (n, (id, balance)) in [("box-000061", 20_000), ("box-000062", 15_000)]
        .into_iter()
        .enumerate()
    {
        let buyer = wire_box::WireBox {
            id: id.into(),
            client: wire_box::connect(&ca, id, gw).await.unwrap(),
            card: wire_box::new_card(&issuer, 0xB0B0_0000 + n as u64, balance, 100_000),
        };
        buyers.push((buyer, balance));
    }
    for (i, (merchant, item)) in [
        ("CABLE", "ppv-1001"),
        ("M-WEBSHOP", "ebook-1"),
        ("CABLE", "ppv-1002"),
        ("CABLE", "shop-2001"),
        ("M-WEBSHOP", "ebook-1"),
    ]
    .into_iter()
    .enumerate()
    {
        let (offer, receipt) = buyers[i % 2].0.buy(merchant, item).await.unwrap();
        assert!(
            matches!(receipt, Message::Receipt(ref r) if r.released),
            "{receipt:?}"
        );
        spent += offer.amount.minor;
        sales.push((i % 2, offer));
    }
    let p = he.running.payment.clone().unwrap();
    let c = he.running.clearing.clone().unwrap();
    assert!(
        eventually(|| p.journal().all(Kind::Txn).unwrap().iter().all(|(k, _)| p
            .txn(k)
            .unwrap()
            .state
            == headend::payment::PayState::Completed))
        .await
    );
    // Issue 17: the first sale refunded to its card, and an unload back to the bank account
    // (one more whose card never ran UNLOAD moves nothing).
    let (who, sale) = &sales[0];
    headend::payment::refund::authorize(&p, &sale.transaction_id, None).unwrap();
    let done = buyers[*who].0.refund(&sale.transaction_id).await.unwrap();
    assert!(
        matches!(done, Message::Receipt(ref r) if r.released),
        "{done:?}"
    );
    let refunded = sale.amount.minor;
    let (_, conf) = l1.unload(2_000, &he.pin).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    let unloaded = 2_000;
    let (offer, cmd) = l1.unload_request(1_000, &he.pin).await;
    assert!(matches!(cmd, Message::LoadCommand(_)), "{cmd:?}");
    let zero = l1.init_unload(&offer, 0);
    let conf = l1
        .call(&LoadBox::response_msg(&offer, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );

    // The batch goes to clearing (the payment server's outbox), the advices too.
    let batch = p.close_batch().unwrap().expect("a batch");
    assert!(
        eventually(
            || p.batch_state(batch.batch) == Some(BatchState::Acknowledged)
                && c.journal().all(Kind::Advice).unwrap().len() == 4
        )
        .await,
        "batch acknowledged and 4 load advices (one an unload) received: {:?}",
        c.journal().kind_counts()
    );
    assert_eq!(batch.refunds.len(), 1);
    let report = c.settle().unwrap().expect("a settlement");
    let float = &report.float[0];
    let loaded = loaded - unloaded;
    let spent = spent - refunded;
    assert_eq!(float.loads, loaded as i64);
    assert_eq!(float.purchases, spent as i64);
    assert_eq!(float.closing, loaded as i64 - spent as i64);
    let payables: u64 = report.acquirers.iter().map(|a| a.amount - a.refunded).sum();
    assert_eq!(payables, spent);

    // What left the funders' accounts = float + acquirer payables.
    let mut debited = 0;
    for f in [
        &he.running.bank.as_ref().unwrap().funds,
        &he.running.load.as_ref().unwrap().prefunded,
    ] {
        for a in f.accounts() {
            debited += a.opening_balance - a.balance;
        }
    }
    assert_eq!(debited as i64, float.closing + payables as i64);
    // The cards: what they gained less what they spent = the float.
    let mut change: i64 = 0;
    change += l1.balance() as i64 - 1_000;
    change += l2.balance() as i64;
    for (b, start) in &mut buyers {
        change += b.balance() as i64 - *start as i64;
    }
    assert_eq!(change, float.closing, "cards vs float");

    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ps, funders) = (names(&["payment"]), names(&["bank", "load"]));
    let j = Journals::find(&he.cfg, &[]).unwrap();
    let breaks = reconcile(&j, &ps, &funders).unwrap();
    assert!(breaks.is_empty(), "{breaks:?}");
    if let Some(pg) = &he.pg {
        pg.assert_every_role_here(&he.cfg.state_dir, &["payment", "bank", "load", "clearing"]);
    }
    he.running.stop().await;
}
