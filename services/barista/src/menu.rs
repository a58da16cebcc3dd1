//! The menu: what can be ordered, what it costs, and which stations it needs.

use brewmesh::pb::barista::v1::{Menu, MenuItem};
use brewmesh::pb::payment::v1::Money;

/// The currency every price is in.
pub const CURRENCY: &str = "USD";

struct Drink {
    id: &'static str,
    name: &'static str,
    description: &'static str,
    cents: i64,
    shots: i32,
    milk: bool,
}

const DRINKS: &[Drink] = &[
    Drink {
        id: "espresso",
        name: "Espresso",
        description: "A single shot, pulled short.",
        cents: 300,
        shots: 1,
        milk: false,
    },
    Drink {
        id: "americano",
        name: "Americano",
        description: "Two shots topped with hot water.",
        cents: 350,
        shots: 2,
        milk: false,
    },
    Drink {
        id: "macchiato",
        name: "Macchiato",
        description: "A shot marked with a spoon of steamed milk.",
        cents: 375,
        shots: 1,
        milk: true,
    },
    Drink {
        id: "cappuccino",
        name: "Cappuccino",
        description: "Two shots under deep milk foam.",
        cents: 450,
        shots: 2,
        milk: true,
    },
    Drink {
        id: "flat_white",
        name: "Flat White",
        description: "Two ristretto shots with velvety microfoam.",
        cents: 450,
        shots: 2,
        milk: true,
    },
    Drink {
        id: "latte",
        name: "Caffè Latte",
        description: "Two shots with plenty of steamed milk.",
        cents: 475,
        shots: 2,
        milk: true,
    },
];

/// The whole menu, in menu order.
pub fn menu() -> Menu {
    Menu {
        items: DRINKS.iter().map(item).collect(),
    }
}

/// The drink with this id, if it is on the menu.
pub fn find(item_id: &str) -> Option<MenuItem> {
    DRINKS.iter().find(|d| d.id == item_id).map(item)
}

fn item(drink: &Drink) -> MenuItem {
    MenuItem {
        item_id: drink.id.into(),
        display_name: drink.name.into(),
        description: drink.description.into(),
        price: Some(Money {
            currency_code: CURRENCY.into(),
            amount_minor: drink.cents,
        }),
        espresso_shots: drink.shots,
        steamed_milk: drink.milk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drink_has_espresso_a_price_and_a_unique_id() {
        let menu = menu();
        let mut ids: Vec<_> = menu.items.iter().map(|i| i.item_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), menu.items.len());
        for item in &menu.items {
            assert!(item.espresso_shots > 0, "{}", item.item_id);
            assert!(item.price.as_ref().is_some_and(|p| p.amount_minor > 0));
        }
        assert!(find("latte").is_some_and(|l| l.steamed_milk));
        assert!(find("americano").is_some_and(|a| !a.steamed_milk));
        assert!(find("tea").is_none());
    }
}
