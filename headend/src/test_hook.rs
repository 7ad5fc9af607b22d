//! TEST HOOKS, for the tests named at each value only: no config key reaches them and a
//! deployed head end never sets them. With [`ENV`] (`HEADEND_TEST_HOOK`) set to one of the
//! values below, the process says so on stderr at that point and freezes the thread there
//! until it is killed, so a test can SIGKILL it exactly in that window.

/// The environment variable naming the hook.
pub const ENV: &str = "HEADEND_TEST_HOOK";

/// Outbox: the receiver acknowledged a message, the acknowledgement is not yet journaled
/// (`headend/tests/clearing_kill.rs`).
pub const OUTBOX_PAUSE_BEFORE_JOURNALING_ACK: &str = "outbox-pause-before-journaling-ack";

/// Gateway, FIG. 4/5: the box's debit response is journaled for the payment server (kind
/// `confirming`), not yet sent to it; the transaction's lock is held
/// (`sim/tests/scenarios.rs`, two gateways).
pub const GATEWAY_PAUSE_BEFORE_ASKING_CONFIRMATION: &str =
    "gateway-pause-before-asking-confirmation";

/// Gateway: a confirmation is accepted and journaled as a release, not yet delivered to the
/// merchant; the transaction's lock is held (`sim/tests/scenarios.rs`, two gateways).
pub const GATEWAY_PAUSE_AFTER_CONFIRMATION_JOURNALED: &str =
    "gateway-pause-after-confirmation-journaled";

/// Freezes here, forever, when [`ENV`] names `hook`; `what` says where on stderr.
pub fn freeze_at(hook: &str, what: impl FnOnce() -> String) {
    if std::env::var_os(ENV).is_some_and(|v| v == hook) {
        eprintln!("headend: TEST HOOK {hook}: {}; frozen until killed", what());
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
