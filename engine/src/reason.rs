//! Why a client is risky: one named reason per detector, and one per
//! configured rule (`rules[]`, named by the operator). Names appear in block
//! bodies, `x-abuse-reasons`, logs and stats, so they are stable API.

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
    /// Reading private objects during a harvest of their route spread over
    /// many clients (each reading a few ids).
    Harvest = 13,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
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
        Reason::Harvest,
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
            Reason::Harvest => "harvest",
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

    fn bit(self) -> u64 {
        1u64 << (self as u8)
    }
}

/// Most rules (`rules[]`): each has a reason bit above the built-ins'.
pub const MAX_RULES: usize = 32;
/// Bits of the built-in reasons; rule `i` is bit `RULE_SHIFT + i`.
const BUILTIN_MASK: u64 = 0xffff_ffff;
const RULE_SHIFT: u32 = 32;

/// A small set of reasons: built-ins in bits 0..32 (the part stored in
/// client records and cached verdicts: [`ReasonSet::bits`]), rules by index
/// in bits 32..64. A rule's name comes from the configuration, so naming a
/// set with rules needs the rule names ([`ReasonSet::names_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReasonSet(u64);

impl ReasonSet {
    /// The built-in reasons of a stored bit set.
    pub fn from_bits(bits: u32) -> ReasonSet {
        ReasonSet(u64::from(bits))
    }

    /// The built-in reasons only: what records and cached verdicts store
    /// (a rule's index means nothing after a reload reorders the rules).
    pub fn bits(self) -> u32 {
        (self.0 & BUILTIN_MASK) as u32
    }

    pub fn insert(&mut self, reason: Reason) {
        self.0 |= reason.bit();
    }

    /// Adds rule `index` (ignored past [`MAX_RULES`]).
    pub fn insert_rule(&mut self, index: usize) {
        if index < MAX_RULES {
            self.0 |= 1u64 << (RULE_SHIFT as usize + index);
        }
    }

    pub fn contains_rule(self, index: usize) -> bool {
        index < MAX_RULES && self.0 & (1u64 << (RULE_SHIFT as usize + index)) != 0
    }

    /// The rules in the set, as a bit set by index.
    pub fn rule_bits(self) -> u32 {
        (self.0 >> RULE_SHIFT) as u32
    }

    /// The set without its rules.
    pub fn builtins(self) -> ReasonSet {
        ReasonSet(self.0 & BUILTIN_MASK)
    }

    /// Rule indices in the set, ascending.
    pub fn rules(self) -> impl Iterator<Item = usize> {
        let bits = self.rule_bits();
        (0..MAX_RULES).filter(move |i| bits & (1u32 << i) != 0)
    }

    pub fn union(self, other: ReasonSet) -> ReasonSet {
        ReasonSet(self.0 | other.0)
    }

    pub fn contains(self, reason: Reason) -> bool {
        self.0 & reason.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.iter().next().is_none() && self.rule_bits() == 0
    }

    /// Known reasons in a stable order (unknown bits from a newer build are skipped).
    pub fn iter(self) -> impl Iterator<Item = Reason> {
        Reason::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// Built-in reason names (rules need their names: [`ReasonSet::names_with`]).
    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Reason::name).collect()
    }

    /// Every name: built-ins, then rules by `rule_names[index]` (a rule
    /// without a name, from another configuration, is skipped).
    pub fn names_with<'a>(self, rule_names: &'a [String]) -> Vec<&'a str> {
        let mut out: Vec<&'a str> = self.iter().map(Reason::name).collect();
        out.extend(self.rules().filter_map(|i| rule_names.get(i).map(String::as_str)));
        out
    }

    /// HTTP status for a block with these (built-in) reasons.
    pub fn block_status(self) -> u32 {
        if self.iter().next().is_some() && self.iter().all(Reason::is_volumetric) {
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

    #[test]
    fn rules_sit_above_the_builtins_and_are_never_stored() {
        let mut s = ReasonSet::default();
        s.insert_rule(0);
        s.insert_rule(31);
        s.insert_rule(32);
        assert!(!s.is_empty());
        assert_eq!(s.bits(), 0, "records store built-ins only");
        assert_eq!(s.rules().collect::<Vec<_>>(), vec![0, 31]);
        s.insert(Reason::Probing);
        let names: Vec<String> = (0..32).map(|i| format!("r{i}")).collect();
        assert_eq!(s.names_with(&names), vec!["probing", "r0", "r31"]);
        assert_eq!(s.names_with(&[]), vec!["probing"]);
        assert_eq!(s.builtins().rule_bits(), 0);
        assert_eq!(s.block_status(), 403);
    }
}
