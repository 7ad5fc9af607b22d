//! Catalog request: every merchant's catalog, merged for the box.

use std::collections::BTreeSet;

use proto::messages::*;

use super::{Gateway, gw};
use crate::limits::Kind;

impl Gateway {
    /// Every merchant's catalog, merged; a merchant that does not answer is left out.
    pub(super) async fn catalog(&self, box_id: &str) -> Message {
        if let Err(e) = self.rate(box_id, Kind::Catalog) {
            return e;
        }
        let names: BTreeSet<&String> = self.merchants.values().map(|m| &m.merchant).collect();
        let mut items = Vec::new();
        for name in names {
            match self.role(name).handle(gw(), Message::CatalogRequest).await {
                Message::Catalog(mut c) => items.append(&mut c),
                other => {
                    tracing::warn!(merchant = %name, box_id, answer = other.kind(), "catalog unavailable")
                }
            }
        }
        Message::Catalog(items)
    }
}
