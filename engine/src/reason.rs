//! Why a client is risky: one named reason per detector. Names appear in
//! block bodies, `x-abuse-reasons`, logs and stats, so they are stable API.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// Over a configured request rate.
    RateLimit = 0,
    /// Many failed logins, many usernames, or an account attacked from many clients.
    CredentialStuffing = 1,
    /// A successful login right after many failures, or by a suspected client.
    AccountTakeover = 2,
    /// Iterating through object ids.
    Enumeration = 3,
    /// Forced browsing, sensitive files, scanner tools.
    Probing = 4,
    /// Harvesting: deep fast pagination, abnormal volume.
    Scraping = 5,
    /// One session token, API key or JWT subject used from many addresses or user agents.
    SessionSharing = 6,
    /// One client churning through many sessions.
    SessionChurn = 7,
    /// A session jumping between countries faster than travel allows.
    ImpossibleTravel = 8,
    /// Traffic from a VPN, Tor, hosting or proxy network.
    AnonymousNetwork = 9,
    /// Driving a sudden rise of an endpoint's traffic over its own baseline.
    EndpointSpike = 10,
    /// Requests at a machine's regular pace (a script, or a partner's integration).
    MachineRhythm = 11,
    /// The scorer's model found the client unlike the sampled traffic of
    /// its route group (set from a tick batch's answer; tag only).
    Anomaly = 12,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::RateLimit,
        Reason::CredentialStuffing,
        Reason::AccountTakeover,
        Reason::Enumeration,
        Reason::Probing,
        Reason::Scraping,
        Reason::SessionSharing,
        Reason::SessionChurn,
        Reason::ImpossibleTravel,
        Reason::AnonymousNetwork,
        Reason::EndpointSpike,
        Reason::MachineRhythm,
        Reason::Anomaly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::RateLimit => "rate_limit",
            Reason::CredentialStuffing => "credential_stuffing",
            Reason::AccountTakeover => "account_takeover",
            Reason::Enumeration => "enumeration",
            Reason::Probing => "probing",
            Reason::Scraping => "scraping",
            Reason::SessionSharing => "session_sharing",
            Reason::SessionChurn => "session_churn",
            Reason::ImpossibleTravel => "impossible_travel",
            Reason::AnonymousNetwork => "anonymous_network",
            Reason::EndpointSpike => "endpoint_spike",
            Reason::MachineRhythm => "machine_rhythm",
            Reason::Anomaly => "anomaly",
        }
    }

    /// Volume reasons answer 429 (slow down); intent reasons answer 403.
    pub fn is_volumetric(self) -> bool {
        matches!(self, Reason::RateLimit | Reason::EndpointSpike)
    }

    /// The action a reason has unless configured otherwise: weak or
    /// collateral-prone signals only tag.
    pub fn default_action(self) -> crate::policy::DetectorAction {
        match self {
            // A partner ramping up is a spike too: its drivers are marked;
            // rate limits (or `"endpoint_spike": "block"`) stop floods.
            // A machine rhythm is also every well-behaved integration.
            // An anomaly is a learned guess, never proof: it marks.
            Reason::SessionChurn
            | Reason::AnonymousNetwork
            | Reason::EndpointSpike
            | Reason::MachineRhythm
            | Reason::Anomaly => {
                crate::policy::DetectorAction::Tag
            }
            // Over a rate is volume, not intent: shed the excess, keep the
            // penalty box for evidence of abuse (a NAT is many people).
            Reason::RateLimit => crate::policy::DetectorAction::Shed,
            _ => crate::policy::DetectorAction::Block,
        }
    }

    fn bit(self) -> u32 {
        1u32 << (self as u8)
    }
}

/// A small set of reasons, stored as a bit set in client records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReasonSet(u32);

impl ReasonSet {
    pub fn from_bits(bits: u32) -> ReasonSet {
        ReasonSet(bits)
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn insert(&mut self, reason: Reason) {
        self.0 |= reason.bit();
    }

    pub fn union(self, other: ReasonSet) -> ReasonSet {
        ReasonSet(self.0 | other.0)
    }

    pub fn contains(self, reason: Reason) -> bool {
        self.0 & reason.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.iter().next().is_none()
    }

    /// Known reasons in a stable order (unknown bits from a newer build are skipped).
    pub fn iter(self) -> impl Iterator<Item = Reason> {
        Reason::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Reason::name).collect()
    }

    /// HTTP status for a block with these reasons.
    pub fn block_status(self) -> u32 {
        if !self.is_empty() && self.iter().all(Reason::is_volumetric) {
            429
        } else {
            403
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_statuses() {
        let mut s = ReasonSet::default();
        assert!(s.is_empty());
        assert_eq!(s.block_status(), 403);
        s.insert(Reason::RateLimit);
        assert_eq!(s.names(), vec!["rate_limit"]);
        assert_eq!(s.block_status(), 429);
        assert!(ReasonSet::from_bits(0x8000_0000).is_empty());
        s.insert(Reason::Probing);
        assert_eq!(s.names(), vec!["rate_limit", "probing"]);
        assert_eq!(s.block_status(), 403);
    }
}
