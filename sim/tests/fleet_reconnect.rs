//! Issue 11, "Must show": the simulated fleet (`sim::loadgen::fleet`) reconnects after
//! a gateway restart. A split head end of real processes; a fleet connected and buying; the
//! gateway process SIGKILLed and restarted with the same configuration; the same fleet, run
//! again with `fleet::run`, buys again (before the fix its boxes kept their
//! dead connections and every purchase failed).

use std::time::Duration;

use sim::deploy::{self, HeadEnd, RoleName, Spec};
use sim::loadgen::fleet::{self, ConnectPlan, Fleet, RunPlan};

#[test]
fn the_loadgen_fleet_buys_again_after_the_gateway_is_sigkilled_and_restarted() {
    let bins = sim::bins::Bins::locate().expect("headend and stbd binaries");
    let dir = tempfile::Builder::new()
        .prefix("purselink-fleet-reconnect-")
        .tempdir()
        .unwrap();
    let layout = deploy::generate(
        dir.path(),
        &Spec {
            stbd_boxes: 0,
            sim_boxes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut he = HeadEnd::start(&layout, &bins.headend).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ids = fleet::issue_identities(&layout.ca_dir, "fleet", 8).unwrap();
        let fleet = Fleet::connect(
            &ids,
            &layout.issuer,
            layout.gateway_addr(),
            ConnectPlan {
                request_timeout: Duration::from_secs(2),
                ..ConnectPlan::default()
            },
            0x0F1E_0000,
        )
        .await
        .unwrap();
        assert_eq!(fleet.len(), 8, "{}", fleet.connect_errors);
        let plan = RunPlan {
            rate: None,
            concurrency: 4,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(3),
            merchant: "F4-L".into(),
            item: "F4-L-a".into(),
        };
        let before = fleet::run(&fleet, &plan).await;
        eprintln!(
            "before the restart: {} of {} purchases",
            before.ok, before.attempted
        );
        assert!(before.ok > 0, "{}", before.errors);

        let gw = he.role(RoleName::Gateway);
        gw.kill();
        let n = gw.start().unwrap();
        gw.wait_ready(n, Duration::from_secs(30)).unwrap();

        // The first purchases on the dead connections fail (no answer within the step
        // deadline); each box then connects again.
        let plan = RunPlan {
            duration: Duration::from_secs(8),
            ..plan
        };
        let after = fleet::run(&fleet, &plan).await;
        eprintln!(
            "after the restart: {} of {} purchases; failures: {}",
            after.ok, after.attempted, after.errors
        );
        assert!(
            after.ok >= 8,
            "the fleet did not come back after the gateway restart: {} ok; {}",
            after.ok,
            after.errors
        );
        fleet.close().await;
    });
    he.stop();
}
