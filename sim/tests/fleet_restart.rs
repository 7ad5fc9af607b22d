//! Issue 14, "Must show": the load generator's fleet — boxes that run the box core
//! (`sim::sim_box`: stb-flow's flows, `stbd`'s gateway client and journal, an in-process
//! card) — against `headend all-in-one` in a child process that is SIGKILLed and restarted
//! in the middle of the run. The boxes connect again by themselves, their recovery rounds
//! settle what the kill left in doubt, and at the end value is conserved: what the cards
//! paid = the security cards' totals = what the merchant released.

use std::time::Duration;

use sim::loadgen::bench::wait_ready;
use sim::loadgen::deploy::{Deployment, Options};
use sim::loadgen::fleet::{self, ConnectPlan, Fleet, RunPlan};

const BOXES: usize = 12;

#[test]
fn the_fleet_survives_a_head_end_sigkilled_mid_run_and_conserves_value() {
    let bins = sim::bins::Bins::locate().expect("headend and stbd binaries");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = Options {
            max_connections: BOXES + 16,
            security_cards: 16,
            ..Options::default()
        };
        let mut deploy = Deployment::child(&opts, &bins.headend, "warn")
            .await
            .unwrap();
        let issuer = headend::config::load_issuer_keys(&deploy.files.issuer_keys).unwrap();
        let ids = fleet::issue_identities(&deploy.files.ca_dir, "restart", BOXES).unwrap();
        wait_ready(&ids[0], deploy.box_addr).await.unwrap();
        let fleet = Fleet::connect(
            &ids,
            &issuer,
            deploy.box_addr,
            ConnectPlan {
                request_timeout: Duration::from_secs(2),
                ..ConnectPlan::default()
            },
            0x0F2E_0000,
        )
        .await
        .unwrap();
        assert_eq!(fleet.len(), BOXES, "{}", fleet.connect_errors);
        let plan = RunPlan {
            rate: None,
            concurrency: 8,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(8),
            ..RunPlan::default()
        };
        // The kill lands while purchases are in flight: 2.5 s into an 8 s run.
        let kill = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            deploy.kill_and_restart(&bins.headend, "warn").unwrap();
        };
        let (during, ()) = tokio::join!(fleet::run(&fleet, &plan), kill);
        eprintln!(
            "run with the kill: {} of {} purchases released; failures: {}",
            during.ok, during.attempted, during.errors
        );
        assert!(during.ok > 0, "{}", during.errors);
        assert!(
            during.attempted > during.ok,
            "the kill broke no purchase, so this run shows nothing: {} of {}",
            during.ok,
            during.attempted
        );
        let after = fleet::run(
            &fleet,
            &RunPlan {
                duration: Duration::from_secs(3),
                ..plan
            },
        )
        .await;
        eprintln!(
            "after: {} of {} purchases; failures: {}",
            after.ok, after.attempted, after.errors
        );
        assert!(
            after.ok >= BOXES as u64 / 2,
            "the fleet did not come back: {}",
            after.errors
        );
        let open = fleet.settle(Duration::from_secs(60)).await;
        assert_eq!(open, 0, "boxes still hold transactions in doubt");
        let debits = fleet.card_debits().await;
        fleet.close().await;
        let c = deploy.stop_and_check(debits).await.unwrap();
        eprintln!("{c}");
        assert!(c.holds(), "{c}");
        assert!(c.releases as u64 >= during.ok + after.ok, "{c}");
    });
}
