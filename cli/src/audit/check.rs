//! The audit's rules: given every order and every payment, what does not
//! add up. Pure: the same lists give the same findings.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use brewmesh::pb::barista::v1::{Order, OrderState};
use brewmesh::pb::payment::v1::{Payment, PaymentState};

/// What kind of mismatch a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A READY order without exactly one capture of its price.
    ReadyNotCapturedOnce,
    /// A FAILED or CANCELLED order with money captured.
    ChargedWithoutDrink,
    /// An authorization neither captured nor voided after the grace.
    AuthorizationLeftOpen,
    /// A payment whose order does not exist.
    PaymentWithoutOrder,
    /// An order not final although nothing happened to it for the grace.
    OrderStuck,
}

impl Kind {
    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ReadyNotCapturedOnce => "ready_not_captured_once",
            Kind::ChargedWithoutDrink => "charged_without_drink",
            Kind::AuthorizationLeftOpen => "authorization_left_open",
            Kind::PaymentWithoutOrder => "payment_without_order",
            Kind::OrderStuck => "order_stuck",
        }
    }
}

/// One thing that does not add up.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// What kind.
    pub kind: Kind,
    /// The order, if there is one.
    pub order_id: String,
    /// The payment, if one is involved.
    pub payment_id: String,
    /// What was seen.
    pub detail: String,
}

impl Finding {
    /// The finding as a JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "kind": self.kind.name(),
            "order_id": self.order_id,
            "payment_id": self.payment_id,
            "detail": self.detail,
        })
    }
}

fn micros(time: Option<&prost_types::Timestamp>) -> i64 {
    time.map_or(0, |t| {
        t.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(t.nanos / 1000))
    })
}

fn is_final(state: OrderState) -> bool {
    matches!(
        state,
        OrderState::Ready | OrderState::Failed | OrderState::Cancelled
    )
}

/// Every finding in `orders` and `payments`, listed in that order, as of
/// `now` (micros): a payment created before `orders_listed_at` must have
/// its order in `orders`; what is younger than `grace` may still be on its
/// way and is left alone.
pub fn check(
    orders: &[Order],
    payments: &[Payment],
    orders_listed_at: i64,
    now: i64,
    grace: Duration,
) -> Vec<Finding> {
    let grace = i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
    let mut by_order: BTreeMap<&str, Vec<&Payment>> = BTreeMap::new();
    for payment in payments {
        by_order.entry(&payment.order_id).or_default().push(payment);
    }
    let known: BTreeSet<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
    let mut findings = Vec::new();
    let finding = |kind, order_id: &str, payment_id: &str, detail: String| Finding {
        kind,
        order_id: order_id.to_owned(),
        payment_id: payment_id.to_owned(),
        detail,
    };

    for order in orders {
        let its = by_order
            .get(order.order_id.as_str())
            .map_or(&[][..], Vec::as_slice);
        let captured: Vec<&&Payment> = its
            .iter()
            .filter(|p| p.state() == PaymentState::Captured)
            .collect();
        match order.state() {
            OrderState::Ready => {
                let price = order.price.as_ref();
                let right = captured.len() == 1 && captured[0].amount.as_ref() == price;
                // The capture settles just after READY: not yet, within grace.
                let settling = captured.is_empty()
                    && now - micros(order.update_time.as_ref()) <= grace
                    && its.iter().any(|p| p.state() == PaymentState::Authorized);
                if !right && !settling {
                    let seen: Vec<String> = its
                        .iter()
                        .map(|p| {
                            let amount = p.amount.as_ref().map_or(0, |a| a.amount_minor);
                            format!("{} {} {amount}", p.payment_id, p.state().as_str_name())
                        })
                        .collect();
                    findings.push(finding(
                        Kind::ReadyNotCapturedOnce,
                        &order.order_id,
                        captured.first().map_or("", |p| p.payment_id.as_str()),
                        format!(
                            "READY at {} minor units; payments: [{}]",
                            price.map_or(0, |p| p.amount_minor),
                            seen.join(", ")
                        ),
                    ));
                }
            }
            OrderState::Failed | OrderState::Cancelled => {
                for payment in &captured {
                    findings.push(finding(
                        Kind::ChargedWithoutDrink,
                        &order.order_id,
                        &payment.payment_id,
                        format!("{} with a capture", order.state().as_str_name()),
                    ));
                }
            }
            state if !is_final(state) && now - micros(order.update_time.as_ref()) > grace => {
                findings.push(finding(
                    Kind::OrderStuck,
                    &order.order_id,
                    &order.payment_id,
                    format!(
                        "{} and unchanged for {} s",
                        state.as_str_name(),
                        (now - micros(order.update_time.as_ref())) / 1_000_000
                    ),
                ));
            }
            _ => {}
        }
    }

    for payment in payments {
        let age = now - micros(payment.update_time.as_ref());
        if payment.state() == PaymentState::Authorized && age > grace {
            findings.push(finding(
                Kind::AuthorizationLeftOpen,
                &payment.order_id,
                &payment.payment_id,
                format!(
                    "AUTHORIZED, neither captured nor voided for {} s",
                    age / 1_000_000
                ),
            ));
        }
        let created = micros(payment.create_time.as_ref());
        if !known.contains(payment.order_id.as_str()) && created < orders_listed_at {
            findings.push(finding(
                Kind::PaymentWithoutOrder,
                &payment.order_id,
                &payment.payment_id,
                format!(
                    "{} for an order that does not exist",
                    payment.state().as_str_name()
                ),
            ));
        }
    }
    findings.sort_by(|a, b| (a.kind, &a.order_id).cmp(&(b.kind, &b.order_id)));
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use brewmesh::pb::payment::v1::Money;
    use prost_types::Timestamp;

    const NOW: i64 = 1_000_000_000;
    const GRACE: Duration = Duration::from_secs(60);

    fn at(micros: i64) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: micros / 1_000_000,
            nanos: 0,
        })
    }

    fn money(minor: i64) -> Option<Money> {
        Some(Money {
            currency_code: "EUR".into(),
            amount_minor: minor,
        })
    }

    fn order(id: &str, state: OrderState, updated: i64) -> Order {
        Order {
            order_id: id.into(),
            state: state as i32,
            price: money(350),
            update_time: at(updated),
            ..Default::default()
        }
    }

    fn payment(id: &str, order_id: &str, state: PaymentState, minor: i64, updated: i64) -> Payment {
        Payment {
            payment_id: id.into(),
            order_id: order_id.into(),
            state: state as i32,
            amount: money(minor),
            create_time: at(0),
            update_time: at(updated),
            ..Default::default()
        }
    }

    #[test]
    fn a_consistent_shop_has_no_finding() {
        let orders = [
            order("o1", OrderState::Ready, 0),
            order("o2", OrderState::Failed, 0),
            order("o3", OrderState::Cancelled, 0),
            order("o4", OrderState::Brewing, NOW),
        ];
        let payments = [
            payment("p1", "o1", PaymentState::Captured, 350, 0),
            payment("p2", "o2", PaymentState::Declined, 350, 0),
            payment("p3", "o3", PaymentState::Voided, 350, 0),
            payment("p4", "o4", PaymentState::Authorized, 350, NOW),
        ];
        assert_eq!(check(&orders, &payments, NOW, NOW, GRACE), []);
    }

    #[test]
    fn each_kind_of_mismatch_is_found() {
        let orders = [
            order("ready-voided", OrderState::Ready, 0),
            order("ready-wrong-amount", OrderState::Ready, 0),
            order("ready-twice", OrderState::Ready, 0),
            order("failed-charged", OrderState::Failed, 0),
            order("stuck", OrderState::Brewing, 0),
        ];
        let payments = [
            payment("p1", "ready-voided", PaymentState::Voided, 350, 0),
            payment("p2", "ready-wrong-amount", PaymentState::Captured, 999, 0),
            payment("p3", "ready-twice", PaymentState::Captured, 350, 0),
            payment("p4", "ready-twice", PaymentState::Captured, 350, 0),
            payment("p5", "failed-charged", PaymentState::Captured, 350, 0),
            payment("p6", "stuck", PaymentState::Authorized, 350, 0),
            payment("p7", "nowhere", PaymentState::Captured, 350, 0),
        ];
        let found: Vec<(Kind, String)> = check(&orders, &payments, NOW, NOW, GRACE)
            .into_iter()
            .map(|f| (f.kind, f.order_id))
            .collect();
        let want = [
            (Kind::ReadyNotCapturedOnce, "ready-twice"),
            (Kind::ReadyNotCapturedOnce, "ready-voided"),
            (Kind::ReadyNotCapturedOnce, "ready-wrong-amount"),
            (Kind::ChargedWithoutDrink, "failed-charged"),
            (Kind::AuthorizationLeftOpen, "stuck"),
            (Kind::PaymentWithoutOrder, "nowhere"),
            (Kind::OrderStuck, "stuck"),
        ];
        let want: Vec<(Kind, String)> = want.iter().map(|(k, o)| (*k, (*o).to_owned())).collect();
        assert_eq!(found, want);
    }

    #[test]
    fn a_ready_order_whose_capture_is_settling_is_found_only_past_the_grace() {
        let orders = [
            order("settling", OrderState::Ready, NOW),
            order("never-settled", OrderState::Ready, 0),
        ];
        let payments = [
            payment("p1", "settling", PaymentState::Authorized, 350, NOW),
            payment("p2", "never-settled", PaymentState::Authorized, 350, 0),
        ];
        let found: Vec<(Kind, String)> = check(&orders, &payments, NOW, NOW, GRACE)
            .into_iter()
            .map(|f| (f.kind, f.order_id))
            .collect();
        let want = [
            (Kind::ReadyNotCapturedOnce, "never-settled".to_owned()),
            (Kind::AuthorizationLeftOpen, "never-settled".to_owned()),
        ];
        assert_eq!(found, want);
    }

    #[test]
    fn a_payment_newer_than_the_order_listing_is_not_an_orphan() {
        let mut late = payment(
            "p1",
            "placed-during-the-audit",
            PaymentState::Authorized,
            350,
            NOW,
        );
        late.create_time = at(NOW);
        assert_eq!(check(&[], &[late], NOW - 1, NOW, GRACE), []);
    }
}
