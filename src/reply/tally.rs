//! The counting of refusals, which [`super::Door`] and [`super::Closer`] do as they answer one:
//! a refusal is counted where it is written, so exactly once. Nothing else counts refusals.

use std::sync::Arc;

use super::{RejectSummary, SourceRefusals};
use crate::metrics::Metrics;
use crate::reason::Refusal;

/// Where a refusal is counted: the `mxgate_rejected_total` series, the periodic summary and
/// the per-source view and log lines.
pub struct Tally {
    metrics: Arc<Metrics>,
    summary: Arc<RejectSummary>,
    sources: Arc<SourceRefusals>,
}

impl Tally {
    pub fn new(
        metrics: Arc<Metrics>,
        summary: Arc<RejectSummary>,
        sources: Arc<SourceRefusals>,
    ) -> Tally {
        Tally {
            metrics,
            summary,
            sources,
        }
    }

    pub(super) fn count(&self, refusal: Refusal) {
        let Refusal { reason, source } = refusal;
        self.metrics.rejected(reason).increment(1);
        self.summary.record(reason, source);
        self.sources.record(reason, source);
    }
}
