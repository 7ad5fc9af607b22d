//! Every ATR in the field corpus (`../shared/field/atr-corpus.tsv` beside the workspace: 215
//! real ATRs from the pcsc-tools list with the fields a correct ISO 7816-3 reading gives) goes
//! through [`atr::accept`], the function the serial driver uses, and each field is compared.
//!
//! The goal (issue 13): every ATR that offers a usable protocol (T=0 or T=1) is accepted; a bad
//! or missing TCK, trailing bytes, short historical bytes and reserved TA1 values are warnings;
//! only an ATR with no usable protocol is refused.
//!
//! How the corpus's pyscard-derived columns map onto the parser:
//! - `tck_present` means "exactly one byte follows the historical bytes" (pyscard's rule), so it
//!   is derived from the parser's TCK and trailing bytes;
//! - `tck_ok` is the XOR check of that one byte;
//! - `extra` is the bytes after the historical bytes, less the TCK when one is required, less
//!   any historical bytes that never came (so -1 is a missing TCK).

use std::path::PathBuf;

use reader_drivers::serial::atr::{self, Atr, AtrError, AtrWarning, Convention, Tck};

fn corpus_path() -> PathBuf {
    // reader-drivers/ → the workspace root → ../shared/field beside it.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/field/atr-corpus.tsv")
}

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

fn opt_hex(b: Option<u8>) -> String {
    b.map_or("-".into(), |b| format!("{b:02X}"))
}

/// The corpus columns as this parser reads them.
fn fields(atr: &Atr) -> Vec<(&'static str, String)> {
    let tck_byte = matches!(atr.tck, Tck::Ok(_) | Tck::Bad { .. } | Tck::Unneeded(_));
    let after = atr.trailing.len() + usize::from(tck_byte);
    let tck_present = after == 1;
    let tck_ok = if !tck_present {
        "-".to_string()
    } else {
        matches!(atr.tck, Tck::Ok(_) | Tck::Unneeded(_)).to_string()
    };
    let missing_hist = atr.historical_expected - atr.historical.len();
    let extra = after as i64 - i64::from(atr.tck_required()) - missing_hist as i64;
    vec![
        (
            "conv",
            match atr.convention {
                Convention::Direct => "Direct".into(),
                Convention::Inverse => "Inverse".into(),
            },
        ),
        (
            "protocols",
            atr.protocols()
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("ta1", opt_hex(atr.ta1())),
        ("fi", atr.fi().map_or("RFU".into(), |f| f.to_string())),
        ("di", atr.di().map_or("RFU".into(), |d| d.to_string())),
        ("tc1", atr.extra_guard_time().to_string()),
        ("wi", atr.wi().to_string()),
        ("ta2", opt_hex(atr.ta2())),
        (
            "historical",
            if atr.historical.is_empty() {
                "-".into()
            } else {
                hex::encode_upper(&atr.historical)
            },
        ),
        ("tck_required", atr.tck_required().to_string()),
        ("tck_present", tck_present.to_string()),
        ("tck_ok", tck_ok),
        ("extra", extra.to_string()),
    ]
}

#[test]
fn every_field_atr_with_a_usable_protocol_is_read_correctly() {
    let path = corpus_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} — the corpus lives in ../shared/field/ beside the workspace",
            path.display()
        )
    });
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (mut total, mut parsed, mut refused) = (0, 0, Vec::new());
    let mut mismatches = Vec::new();
    let mut warned = std::collections::BTreeMap::<String, usize>::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        total += 1;
        let row: Vec<&str> = line.split('\t').collect();
        let bytes = hex(row[col("atr")]);
        let tags: Vec<&str> = row[col("tags")].split(',').collect();
        let usable = row[col("protocols")]
            .split(',')
            .any(|t| t == "0" || t == "1");
        match atr::accept(&bytes) {
            Ok(atr) => {
                parsed += 1;
                assert!(usable, "{line}: accepted without a usable protocol");
                for (name, got) in fields(&atr) {
                    let want = row[col(name)];
                    if got != want {
                        mismatches.push(format!("{}: {name} is {got}, corpus says {want}", row[0]));
                    }
                }
                // The faults the tags name are reported as warnings.
                let has = |f: &dyn Fn(&AtrWarning) -> bool| atr.warnings.iter().any(f);
                for tag in &tags {
                    let ok = match *tag {
                        "tck_missing" => has(&|w| matches!(w, AtrWarning::MissingTck)),
                        "tck_bad" => has(&|w| {
                            matches!(
                                w,
                                AtrWarning::BadTck { .. } | AtrWarning::TrailingBytes { .. }
                            )
                        }),
                        // A single byte after a T=0 ATR that happens to check as a TCK is
                        // reported as an unneeded TCK: a warning either way.
                        "t0_trailing" | "trailing_after_tck" => has(&|w| {
                            matches!(
                                w,
                                AtrWarning::TrailingBytes { .. } | AtrWarning::UnneededTck
                            )
                        }),
                        "truncated" => {
                            has(&|w| matches!(w, AtrWarning::HistoricalTruncated { .. }))
                        }
                        "ta1_reserved" => has(&|w| matches!(w, AtrWarning::ReservedTa1 { .. })),
                        _ => true,
                    };
                    if !ok {
                        mismatches.push(format!(
                            "{}: tagged {tag} but warned only {:?}",
                            row[0], atr.warnings
                        ));
                    }
                }
                for w in &atr.warnings {
                    let kind = format!("{w:?}");
                    let kind = kind.split([' ', '{']).next().unwrap_or("").to_string();
                    *warned.entry(kind).or_default() += 1;
                }
            }
            Err(e) => {
                assert!(
                    !usable,
                    "{line}: refused ({e}) although it offers a usable protocol"
                );
                assert!(
                    matches!(e, AtrError::NoUsableProtocol { .. }),
                    "{line}: refused for {e}"
                );
                refused.push(format!("{} — {e}", row[0]));
            }
        }
    }
    eprintln!(
        "ATR corpus: {total} ATRs, {parsed} accepted, {} refused; warnings: {warned:?}",
        refused.len()
    );
    for r in &refused {
        eprintln!("  refused: {r}");
    }
    assert!(
        mismatches.is_empty(),
        "{} field mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_eq!(total, 215, "the corpus holds 215 ATRs");
    assert_eq!(parsed + refused.len(), total);
    assert_eq!(refused.len(), 2, "only the two T=14-only ATRs are refused");
}
