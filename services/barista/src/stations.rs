//! Where the barista's drinks are made: its stations, each a fixed number
//! of machines with a bounded queue in front ([`Station`], from
//! `brewmesh-station`), in this process or at station replicas of their own
//! ([`crate::remote`]).
//!
//! Either way the barista admits an order at every station its drink needs
//! when the order is placed, without waiting, so a full shop answers at
//! once. With remote stations the local "machines" are how many parts this
//! barista has at the station replicas at once; the replicas queue and
//! brew.

pub use brewmesh_station::machines::{Load, Place, Station};

use crate::remote::Remote;

/// The shop's stations.
#[derive(Debug)]
pub struct Stations {
    /// Espresso machines: every drink needs one.
    pub espresso: Station,
    /// Steam wands: drinks with milk need one.
    pub milk: Station,
    /// The station replicas that brew, when they are not in this process.
    pub remote: Option<Remote>,
}

/// The admission permits of one order: released as each station is done.
#[derive(Debug)]
pub struct Admission {
    /// The place at the espresso station: every drink needs one.
    pub espresso: Place,
    /// The place at the milk station, for drinks with milk.
    pub milk: Option<Place>,
}

impl Stations {
    /// Places at every station the drink needs, or the first full station
    /// (taking nothing).
    pub fn try_admit(&self, steamed_milk: bool) -> Result<Admission, &Station> {
        let espresso = self.espresso.try_admit().ok_or(&self.espresso)?;
        let milk = if steamed_milk {
            Some(self.milk.try_admit().ok_or(&self.milk)?)
        } else {
            None
        };
        Ok(Admission { espresso, milk })
    }

    /// Places at every station the drink needs, waiting for them.
    pub async fn admit(&self, steamed_milk: bool) -> Admission {
        let espresso = self.espresso.admit().await;
        let milk = if steamed_milk {
            Some(self.milk.admit().await)
        } else {
            None
        };
        Admission { espresso, milk }
    }
}
