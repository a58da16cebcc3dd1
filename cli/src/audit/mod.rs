//! `brewmesh audit`: proves from the services' own records that every
//! charge matches a drink. It pages through every order (the barista's
//! ListOrders) and every payment (the payment service's ListPayments) of a
//! running mesh, any replica, without stopping it, and reports each order
//! whose money does not match its state (see [`check`]). Exit status 1 on
//! any finding; a JSON report on request.

mod check;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{ListOrdersRequest, Order};
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{ListPaymentsRequest, Payment};
use brewmesh_runtime::server::parse_duration;

/// `brewmesh audit` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A barista replica to list the orders from.
    #[arg(long, default_value = brewmesh_runtime::defaults::BARISTA_ADDR)]
    barista: String,

    /// A payment replica to list the payments from.
    #[arg(long, default_value = brewmesh_runtime::defaults::PAYMENT_ADDR)]
    payment: String,

    /// What is younger than this may still be on its way (an open
    /// authorization, an unfinished order) and is not a finding.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    grace: Duration,

    /// Write the findings here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// How many records each page asks for.
const PAGE: i32 = 1000;

async fn orders(address: &str) -> anyhow::Result<Vec<Order>> {
    let channel = brewmesh_runtime::client::channel(address).context("the --barista address")?;
    let mut client = BaristaClient::new(channel);
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_orders(ListOrdersRequest {
                page_size: PAGE,
                page_token: token,
                ..Default::default()
            })
            .await
            .context("listing the orders")?
            .into_inner();
        all.extend(page.orders);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

async fn payments(address: &str) -> anyhow::Result<Vec<Payment>> {
    let channel = brewmesh_runtime::client::channel(address).context("the --payment address")?;
    let mut client = PaymentsClient::new(channel);
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_payments(ListPaymentsRequest {
                page_size: PAGE,
                page_token: token,
                ..Default::default()
            })
            .await
            .context("listing the payments")?
            .into_inner();
        all.extend(page.payments);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

/// Runs the audit; `Ok(true)` when nothing was found.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    // Orders first: a payment made after this instant may belong to an
    // order the listing missed.
    let orders_listed_at = brewmesh_runtime::time::now_micros();
    let orders = orders(&args.barista).await?;
    let payments = payments(&args.payment).await?;
    let now = brewmesh_runtime::time::now_micros();
    let findings = check::check(&orders, &payments, orders_listed_at, now, args.grace);

    println!(
        "audited {} orders and {} payments: {} finding(s)",
        orders.len(),
        payments.len(),
        findings.len()
    );
    for finding in &findings {
        println!(
            "  {:<24} order {} payment {}: {}",
            finding.kind.name(),
            if finding.order_id.is_empty() {
                "-"
            } else {
                &finding.order_id
            },
            if finding.payment_id.is_empty() {
                "-"
            } else {
                &finding.payment_id
            },
            finding.detail
        );
    }
    if let Some(path) = &args.json {
        let report = json!({
            "orders": orders.len(),
            "payments": payments.len(),
            "grace_seconds": args.grace.as_secs_f64(),
            "findings": findings.iter().map(check::Finding::to_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(findings.is_empty())
}
