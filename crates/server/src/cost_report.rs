//! `spot-runners report`: cost, spot savings, savings lost to
//! interruptions and re-runs over a window, from the ledger and the price
//! table. The sums are [`spot_runners_domain::cost::summarize`]; this is the
//! reading and the wording.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use spot_runners_domain::cost::{summarize, CostLine, CostReport, ReportBy};
use spot_runners_store::Store;

use crate::configuration::Settings;
use crate::spend::price_table;
use crate::Error;

pub async fn report(
    store: &dyn Store,
    settings: &Settings,
    since: chrono::Duration,
    by: ReportBy,
    now: DateTime<Utc>,
) -> Result<String, Error> {
    let from = now - since;
    let prices = price_table(&store.prices().await?);
    let usage = store
        .usage(settings.controller_id.as_str(), from, now)
        .await?;
    let report = summarize(&usage, &prices, from, now, by);
    Ok(render(&report, by, from, now))
}

fn dollars(v: f64) -> String {
    format!("${v:.2}")
}

fn line(out: &mut String, name: &str, l: &CostLine) {
    let _ = writeln!(
        out,
        "{name:<32} {:>7} {:>9.1} {:>11} {:>12} {:>12} {:>6} {:>6} {:>5}",
        l.runners,
        l.hours,
        dollars(l.cost),
        dollars(l.spot_savings),
        dollars(l.lost_to_interruptions),
        l.jobs_interrupted,
        l.jobs_rerun,
        l.jobs_lost,
    );
}

/// The report as text: a header, a line per group, the total, and what
/// could not be priced.
pub fn render(r: &CostReport, by: ReportBy, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cost from {} to {} by {by}",
        from.format("%Y-%m-%d %H:%M UTC"),
        to.format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        out,
        "{:<32} {:>7} {:>9} {:>11} {:>12} {:>12} {:>6} {:>6} {:>5}",
        by.to_string(),
        "runners",
        "hours",
        "cost",
        "spot saved",
        "lost (intr.)",
        "intr.",
        "re-run",
        "lost"
    );
    for l in &r.lines {
        let name = l.key.as_deref().unwrap_or("(no job)");
        line(&mut out, name, l);
    }
    line(&mut out, "total", &r.total);
    let t = &r.total;
    let _ = writeln!(
        out,
        "spot savings {} against on-demand for the same hours; {} of instance time thrown away with interrupted jobs; {} of {} interrupted jobs re-run, {} lost",
        dollars(t.spot_savings),
        dollars(t.lost_to_interruptions),
        t.jobs_rerun,
        t.jobs_interrupted,
        t.jobs_lost
    );
    if !t.missing_prices.is_empty() || t.unpriced_hours > 0.0 {
        let missing: Vec<String> = t
            .missing_prices
            .iter()
            .map(|(ty, m)| format!("{ty} {m}"))
            .collect();
        let _ = writeln!(
            out,
            "price unknown for: {} ({:.1} instance-hours left out of the cost; add rows to instance_prices, docs/operations.md)",
            if missing.is_empty() { "runners with no recorded type".to_owned() } else { missing.join(", ") },
            t.unpriced_hours
        );
    }
    out
}
