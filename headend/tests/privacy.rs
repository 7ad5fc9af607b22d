//! Issue 17, privacy (seed 004 PASSBOOK and privacy; 002's anonymous payment on request):
//! a card whose holder turned privacy on (SET PRIVACY) says so in its INITIALIZE FOR
//! PURCHASE under its MAC, and the payment server keeps no card id in its journal or its
//! collection batches — a per-transaction pseudonym names the card — while retries,
//! cancels, refunds, clearing and reconciliation work as for any card.
//!
//! - `a_private_card_is_named_nowhere_in_payment_journals_or_batches`: split roles over
//!   QUIC with clearing, in each of the four embodiments (FIG. 4–7): a private card and a
//!   clear card buy (the private card's records keep no counter or balance, which would
//!   chain its sales); the private card's sale is refunded after its holder turned privacy
//!   off again (the sale stays private); the batch goes to clearing;
//!   `headend reconcile` holds; then every byte of the payment server's journal files, the
//!   exported batch and clearing's journal is searched for the private card's id in every
//!   encoding a record could hold it (big- and little-endian, postcard's varint, decimal,
//!   hex) — and the clear card's id is found by the same search, so it can fail.
//! - `a_private_card_s_retries_cancels_and_proofs_work_on_its_pseudonym`: the payment
//!   server's own answers to a private card's retried draw request and debit response are
//!   the stored ones; another draw under the same id is refused; a cancel with another
//!   card's proof is refused, with the card's own proof it reverses; an authentication
//!   still names the member to its loyalty merchant (FIG. 4–6).

mod clearing_support;
mod purchase_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use clearing_support::*;
use headend::assembly::Roles;
use headend::payment::privacy::CardNaming;
use headend::role::{Caller, Role};
use proto::card::commands;
use proto::messages::*;
use purchase_support::pg_rig::Backend;
use purchase_support::*;

/// The files under `dir` (recursively) holding `card_id` in any of its [`encodings`]:
/// `(file, encoding index)`.
fn holders(dir: &Path, card_id: u64) -> Vec<(PathBuf, usize)> {
    let needles = headend::payment::privacy::card_id_encodings(card_id);
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for (i, n) in needles.iter().enumerate() {
                if bytes.windows(n.len()).any(|w| w == n.as_slice()) {
                    out.push((p.clone(), i));
                }
            }
        }
    }
    out
}

fn receipt(m: &Message) -> &Receipt {
    match m {
        Message::Receipt(r) => r,
        other => panic!("not a receipt: {other:?}"),
    }
}

fn refused(m: &Message, code: ErrorCode, words: &str) {
    match m {
        Message::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.reason.contains(words), "{:?} lacks {words:?}", e.reason);
        }
        other => panic!("not refused: {other:?}"),
    }
}

fn headend(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// SET PRIVACY on the box's card (the test cards have no PIN, so no VERIFY first).
fn privacy_on(b: &mut TestBox) {
    b.apdu(&commands::select());
    let r = b.apdu(&commands::set_privacy(true));
    assert!(r.sw.is_ok(), "SET PRIVACY: {}", r.sw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_card_is_named_nowhere_in_payment_journals_or_batches() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    for embodiment in ["security-card", "payment-server", "gateway", "merchant"] {
        let d = deployment_with(Backend::Sqlite, embodiment).unwrap();
        let only = |f: fn(&mut Roles)| {
            let mut r = Roles::NONE;
            f(&mut r);
            r
        };
        let clearing = d.start("clearing", only(|r| r.clearing = true)).await;
        let cable = d.start("payment", only(|r| r.payment = true)).await;
        let web = d.start("payment-web", only(|r| r.payment = true)).await;
        let merchant = d.start("merchant", only(|r| r.merchant = true)).await;
        let gateway = d.start("gateway", only(|r| r.gateway = true)).await;
        let gw_addr = gateway.gateway_addr.unwrap();
        let ca = d.dir.path().join("ca");
        let cfg = headend::config::HeadendConfig::load(&d.dir.path().join("headend.toml")).unwrap();
        let mut a = TestBox::connect(&ca, &cfg, "box-000401", gw_addr, 10_000).await;
        let mut b = TestBox::connect(&ca, &cfg, "box-000402", gw_addr, 20_000).await;
        let (private_id, clear_id) = (a.0.card_id(), b.0.card_id());
        privacy_on(&mut a);

        let (sale, r) = a.buy("CABLE", "ppv-1001").await;
        assert!(receipt(&r).released, "{embodiment}: {r:?}");
        let (second, r) = a.buy("CABLE", "ppv-1002").await;
        assert!(receipt(&r).released, "{embodiment}: {r:?}");
        let (_, r) = b.buy("CABLE", "ppv-1001").await;
        assert!(receipt(&r).released, "{embodiment}: {r:?}");
        let pc = cable.payment.clone().unwrap();
        assert!(
            eventually(|| completed(&pc).len() == 3).await,
            "{embodiment}"
        );
        let paid = a.balance();

        // The records name the private card by a pseudonym per transaction.
        let (t1, t2) = (
            pc.txn(&sale.transaction_id).unwrap(),
            pc.txn(&second.transaction_id).unwrap(),
        );
        assert!(
            matches!(t1.naming, CardNaming::Pseudonym { .. }),
            "{embodiment}"
        );
        assert!(
            t1.card_id != private_id && t2.card_id != private_id && t1.card_id != t2.card_id,
            "{embodiment}: one pseudonym per transaction"
        );
        // Nothing that chains the card's sales: no counter, no balance after.
        for t in [&t1, &t2] {
            let r = t.debit_response.as_ref().unwrap();
            assert_eq!((r.atc, r.new_balance), (0, 0), "{embodiment}: {r:?}");
        }
        let clear_sale = completed(&pc)
            .into_iter()
            .find(|t| t.card_id == clear_id)
            .unwrap();
        assert_ne!(
            clear_sale.debit_response.unwrap().new_balance,
            0,
            "a clear card's record keeps its balance"
        );

        // The holder turns privacy off before the refund: the sale stays private.
        a.apdu(&commands::select());
        assert!(a.apdu(&commands::set_privacy(false)).sw.is_ok());

        // The merchant refunds the private sale: due to that card only, credited once.
        let (ok, out) = headend(&[
            "refund".as_ref(),
            "--config".as_ref(),
            d.configs["payment"].as_os_str(),
            "--txid".as_ref(),
            sale.transaction_id.as_ref(),
        ]);
        assert!(ok && out.contains("private"), "{embodiment}: {out}");
        assert!(!out.contains(&format!("{private_id:X}")), "{out}");
        let due = a.0.refunds_due().await.unwrap();
        assert_eq!(due.len(), 1, "{embodiment}: {due:?}");
        assert_eq!(due[0].transaction_id, sale.transaction_id);
        assert_eq!(b.0.refunds_due().await.unwrap(), vec![], "{embodiment}");
        let wrong = b.0.refund_request(&sale.transaction_id).unwrap();
        refused(
            &b.call(&Message::RefundRequest(wrong)).await,
            ErrorCode::NotYourAccount,
            "another card",
        );
        let done =
            a.0.refund(&sale.transaction_id)
                .await
                .unwrap_or_else(|e| panic!("{embodiment}: {e}"));
        assert!(receipt(&done).released, "{embodiment}: {done:?}");
        assert_eq!(
            a.balance(),
            paid + sale.amount.minor,
            "{embodiment}: credited"
        );
        assert_eq!(a.0.refunds_due().await.unwrap(), vec![], "{embodiment}");

        // The batch: pseudonyms for the private card, the clear card by its id.
        let batch = pc.close_batch().unwrap().expect("a batch");
        assert_eq!((batch.records.len(), batch.refunds.len()), (3, 1));
        let ids: Vec<u64> = batch.records.iter().map(|r| r.card_id).collect();
        assert!(ids.contains(&clear_id), "{embodiment}: {ids:X?}");
        assert!(!ids.contains(&private_id), "{embodiment}: {ids:X?}");
        assert_eq!(batch.refunds[0].card_id, t1.card_id, "{embodiment}");
        let export = d.dir.path().join("export");
        pc.export_batch(batch.batch, &export).unwrap();
        assert!(
            eventually(|| pc.batch_state(batch.batch)
                == Some(headend::payment::collection::BatchState::Acknowledged))
            .await,
            "{embodiment}: clearing acknowledged the batch"
        );
        let (ok, out) = d.reconcile();
        assert!(ok, "{embodiment}: reconcile: {out}");

        for r in [gateway, merchant, web, cable, clearing] {
            r.stop().await;
        }
        // The raw files: the payment server's journal (and WAL), the exported batch,
        // clearing's journal.
        for dir in [d.state("payment"), export.clone(), d.state("clearing")] {
            let found = holders(&dir, private_id);
            assert!(
                found.is_empty(),
                "{embodiment}: the private card's id {private_id:X} is in {found:?}"
            );
        }
        let control = holders(&d.state("payment"), clear_id);
        assert!(
            !control.is_empty(),
            "{embodiment}: the search must find the clear card {clear_id:X} in the payment journal"
        );
        assert!(
            !holders(&export, clear_id).is_empty(),
            "{embodiment}: and in the batch"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_card_s_retries_cancels_and_proofs_work_on_its_pseudonym() {
    for embodiment in ["security-card", "payment-server", "gateway"] {
        let he = start_prepared(Backend::Sqlite, options(embodiment, true), |path, text| {
            with_benefits_server(path, text, embodiment)
        })
        .await
        .unwrap();
        let pc = he.running.payment.clone().unwrap();
        let gw = || Caller::Role("gateway".into());
        let mut a = TestBox::new(&he, "box-000501", 10_000).await;
        let mut b = TestBox::new(&he, "box-000502", 20_000).await;
        let private_id = a.0.card_id();
        privacy_on(&mut a);

        // The payment server's answers to a retried draw and debit response.
        let offer = a.offer("CABLE", "ppv-1001").await;
        let draw = a.draw_request(&offer);
        let first = pc.handle(gw(), Message::DrawRequest(draw.clone())).await;
        let again = pc.handle(gw(), Message::DrawRequest(draw)).await;
        assert_eq!(
            first, again,
            "{embodiment}: a retried draw gets the stored answer"
        );
        let Message::RoutedDebitCommand { command, .. } = first else {
            panic!("{embodiment}: {first:?}")
        };
        let cmd = TestBox::open_debit_command(&offer, &Message::DebitCommand(command));
        assert_eq!(
            cmd.card_id, private_id,
            "the card gets a command it can run"
        );
        let resp = a.debit(&offer, &cmd);
        let done = pc.handle(gw(), Message::DebitResponse(resp.clone())).await;
        assert!(
            matches!(done, Message::Confirmation(_)),
            "{embodiment}: {done:?}"
        );
        assert_eq!(
            pc.handle(gw(), Message::DebitResponse(resp)).await,
            done,
            "{embodiment}: a retried debit response gets the stored confirmation"
        );
        let other = a.draw_request(&offer);
        refused(
            &pc.handle(gw(), Message::DrawRequest(other)).await,
            ErrorCode::Replay,
            "another draw request",
        );
        let t = pc.txn(&offer.transaction_id).unwrap();
        assert_ne!(t.card_id, private_id);
        assert!(t.debit_command.clear().is_none(), "kept sealed");
        assert!(t.confirmation.as_ref().unwrap().clear().is_none());
        assert_eq!(
            t.debit_response.as_ref().map(|r| r.card_id),
            Some(t.card_id),
            "{embodiment}: the debit response kept names the pseudonym"
        );

        // A cancel: another card's proof is refused; the card's own reverses.
        let offer = a.offer("CABLE", "ppv-1002").await;
        let draw = a.draw_request(&offer);
        let issued = pc.handle(gw(), Message::DrawRequest(draw)).await;
        assert!(
            matches!(issued, Message::RoutedDebitCommand { .. }),
            "{issued:?}"
        );
        let cancel = |proof| {
            Message::Cancel(CancelMsg {
                transaction_id: offer.transaction_id.clone(),
                reason: CancelReason::Viewer,
                proof: Some(proof),
            })
        };
        refused(
            &pc.handle(gw(), cancel(b.proof())).await,
            ErrorCode::ProofRejected,
            "another card",
        );
        let r = pc.handle(gw(), cancel(a.proof())).await;
        assert!(!receipt(&r).released, "{embodiment}: {r:?}");
        assert_eq!(
            pc.txn(&offer.transaction_id).map(|t| t.state),
            Some(headend::payment::PayState::Reversed),
            "{embodiment}"
        );
        // An authentication (002 FIG. 16) tells its merchant which member is there: a
        // private card is still recognised, and the payment records name it by pseudonym.
        let (auth, r) = a.buy("M-MILES", "lounge").await;
        let r = receipt(&r);
        assert!(
            r.released && r.text.contains("FF-0042"),
            "{embodiment}: {r:?}"
        );
        assert_ne!(pc.txn(&auth.transaction_id).unwrap().card_id, private_id);
        he.running.stop().await;
    }
}
